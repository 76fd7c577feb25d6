"""A PEFT LoRA adapter seen as a full checkpoint: every tensor as ``merge_and_unload()`` would leave it.

Every layout PEFT 0.21 saves for LoRA is read (the arithmetic is in ``peft_math``):
- ``<module>.lora_A/lora_B[.weight]`` (linear, Conv1D with ``fan_in_fan_out``, convolutions) and
  ``<module>.lora_embedding_A/B`` (embeddings), scaled by lora_alpha / r (rsLoRA, ``rank_pattern`` and
  ``alpha_pattern`` honoured); ``lora_B.bias`` (``lora_bias``) added to the module's bias;
- ``<module>.lora_magnitude_vector`` (DoRA);
- ``<module>.base_layer.<param>``: the module's own weights as saved with the adapter (an embedding saved with
  ``save_embedding_layers``, biases trained with ``bias="all"`` / ``"lora_only"``), used in place of the base's;
- ``<module>.token_adapter.trainable_tokens_delta`` (``trainable_token_indices``): rows replaced;
- any other tensor (``modules_to_save``, biases): replaces the base's tensor of that name.
Module names are matched to the base's tensors as they are, then through a tied head (a tied model's ``lm_head``
is its embedding), then through transformers 5's runtime names (PEFT saves what the model calls its modules at
runtime, e.g. ViT's ``vit.layers.0.attention.q_proj`` for ``vit.encoder.layer.0.attention.attention.query``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..architectures import runtime_names, tied_partner
from ..errors import SourceError
from . import peft_math
from .base import CheckpointSource, TensorSpec
from .safetensors_files import LocalFile, SafetensorsCheckpoint

_PREFIX = "base_model.model."
_ADAPTER = r"(?:\.default)?"
_LORA = re.compile(rf"^(?P<m>.+)\.(?P<k>lora_A|lora_B|lora_embedding_A|lora_embedding_B){_ADAPTER}"
                   r"(?:\.(?P<p>weight|bias))?$")
_MAGNITUDE = re.compile(rf"^(?P<m>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$")
_BASE_LAYER = re.compile(r"^(?P<m>.+)\.base_layer\.(?P<p>[^.]+)$")
_TOKENS = re.compile(rf"^(?P<m>.+)\.token_adapter\.trainable_tokens_delta{_ADAPTER}$")
_SAVED = re.compile(rf"^(?P<m>.+)\.modules_to_save{_ADAPTER}\.(?P<p>.+)$")
_ORIGINAL = re.compile(r"^.+\.original_module\..+$")  # the frozen copy beside a modules_to_save module
_UNMERGEABLE = {"layer_replication": "layer replication", "alora_invocation_tokens": "activated LoRA (aLoRA)"}


class LoraCheckpoint(CheckpointSource):
    def __init__(self, adapter_dir: str, base: CheckpointSource) -> None:
        self.label = adapter_dir
        self._base = base
        self.owns_base = False  # a `model+lora` reference opened its model for this adapter alone
        root = Path(adapter_dir)
        try:
            cfg = json.loads((root / "adapter_config.json").read_text())
        except (OSError, ValueError):
            raise SourceError(f"{adapter_dir}: adapter_config.json cannot be read as JSON") from None
        if not isinstance(cfg, dict):
            raise SourceError(f"{adapter_dir}: adapter_config.json is not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise SourceError(f"{adapter_dir}: PEFT type {cfg.get('peft_type')!r} is not supported (only LORA "
                              "and its variants: DoRA, rsLoRA, trainable tokens)")
        for key, what in _UNMERGEABLE.items():
            if cfg.get(key):
                raise SourceError(f"{adapter_dir}: {what} (`{key}`) cannot be merged into the weights")
        weights = root / "adapter_model.safetensors"
        if not weights.is_file():
            if (root / "adapter_model.bin").is_file():
                raise SourceError(f"{adapter_dir}: the adapter is a PyTorch pickle (adapter_model.bin); save it "
                                  "with safe_serialization=True")
            raise SourceError(f"{adapter_dir}: adapter_model.safetensors is missing")
        self._adapter = SafetensorsCheckpoint(adapter_dir, {"adapter_model.safetensors": LocalFile(str(weights))})
        self._cfg = cfg
        self._base_specs = base.specs()
        self._runtime: dict[str, str] | None = None
        self._mods: dict[str, dict] = {}  # base weight name -> {"module", "A", "B", "embedding", "magnitude"}
        self._bias: dict[str, tuple[str, str]] = {}  # base bias name -> (module, lora_B bias key)
        self._tokens: dict[str, tuple[str, list[int]]] = {}  # base weight name -> (delta key, row indices)
        self._replaced: dict[str, str] = {}  # base tensor name -> adapter key
        self._cache: tuple[str, torch.Tensor] | None = None
        for key in self._adapter.specs():
            self._parse(key)
        for entry in self._mods.values():
            if "A" not in entry or "B" not in entry:
                raise SourceError(f"{adapter_dir}: module {entry['module']!r} has only one of lora_A / lora_B")
        self._specs = dict(self._base_specs)
        for name, key in self._replaced.items():
            self._specs[name] = self._adapter.specs()[key]

    # ----- reading the adapter's keys -----
    def _parse(self, key: str) -> None:
        short = key.removeprefix(_PREFIX)
        if m := _LORA.match(short):
            if m["p"] == "bias":
                self._bias[self._target(m["m"], "bias", key)] = (m["m"], key)
                return
            entry = self._mods.setdefault(self._target(m["m"], "weight", key), {"module": m["m"]})
            entry["A" if m["k"].endswith("A") else "B"] = key
            entry["embedding"] = "embedding" in m["k"]
        elif m := _MAGNITUDE.match(short):
            self._mods.setdefault(self._target(m["m"], "weight", key), {"module": m["m"]})["magnitude"] = key
        elif m := _TOKENS.match(short):
            rows = peft_math.token_indices(self._cfg, m["m"])
            if rows is None:
                raise SourceError(f"{self.label}: trainable tokens for {m['m']!r}, but adapter_config.json's "
                                  "`trainable_token_indices` does not say which")
            self._tokens[self._target(m["m"], "weight", key)] = (key, rows)
        elif _ORIGINAL.match(short):
            return
        elif (m := _BASE_LAYER.match(short)) or (m := _SAVED.match(short)):
            self._replaced[self._target(m["m"], m["p"], key)] = key
        else:
            module, _, param = short.rpartition(".")
            self._replaced[self._target(module, param, key) if module else short] = key

    def _target(self, module: str, param: str, key: str) -> str:
        """The base tensor a module's parameter stands for: by name, as a tied head, or by its runtime name."""
        name = f"{module}.{param}"
        if name in self._base_specs:
            return name
        tied = tied_partner(name, self._base_specs)
        if tied is not None:
            return tied
        if self._runtime is None:
            from .local import read_json_file

            self._runtime = runtime_names(self._base_specs, read_json_file(self._base, "config.json"))
        if name in self._runtime:
            return self._runtime[name]
        raise SourceError(f"{self.label}: adapter tensor {key!r} targets {name!r}, which the base {self._base.label} "
                          "does not have (checked its names, its tied head and transformers 5's runtime names)")

    # ----- the checkpoint -----
    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self._mods and name not in self._tokens and name not in self._bias:
            return self._stored(name, rows)
        # merged whole, then cut: a band's rows get the same bytes as the whole tensor's (DoRA's norms, token rows
        # and matrix products need the whole tensor anyway); one tensor is kept for the next bands
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, self._merged(name))
        whole = self._cache[1]
        return whole if rows is None else whole[rows[0]:rows[1]]

    def _stored(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        if name in self._replaced:
            return self._adapter.read(self._replaced[name], rows)
        return self._base.read(name, rows)

    def _merged(self, name: str) -> torch.Tensor:
        stored = self._stored(name, None)
        weight = stored.float()
        entry, tokens, bias = self._mods.get(name), self._tokens.get(name), self._bias.get(name)
        if entry is not None:
            a = self._adapter.read(entry["A"]).float()
            b = self._adapter.read(entry["B"]).float()
            s = peft_math.scale(self._cfg, entry["module"], a.shape[0])
            update, transposed = peft_math.delta(a, b, entry["embedding"], self._specs[name].shape, s,
                                                 bool(self._cfg.get("fan_in_fan_out")))
            if update.shape != weight.shape:
                raise SourceError(f"{self.label}: LoRA update for {name!r} has shape {list(update.shape)}, the base "
                                  f"tensor {list(weight.shape)}")
            if "magnitude" in entry:
                weight = peft_math.dora(weight, update, self._adapter.read(entry["magnitude"]).float(), transposed)
            else:
                weight = weight + update
        if bias is not None:
            module, key = bias
            target = _weight_of(self._mods, module)
            rank = self._adapter.specs()[self._mods[target]["A"]].shape[0] if target else int(self._cfg.get("r", 8))
            weight = weight + peft_math.scale(self._cfg, module, rank) * self._adapter.read(key).float()
        if tokens is not None:
            key, indices = tokens
            weight = weight.index_copy(0, torch.tensor(indices), self._adapter.read(key).float())
        return weight.to(stored.dtype)

    def bytes_read(self) -> int:
        return self._adapter.bytes_read() + (self._base.bytes_read() if self.owns_base else 0)

    def file_names(self) -> list[str]:
        return self._base.file_names()

    def read_file(self, filename: str) -> bytes | None:
        return self._base.read_file(filename)

    def notes(self) -> list[str]:
        named = self._cfg.get("base_model_name_or_path")
        if not isinstance(named, str) or not named or _same_model(named, self._base.label):
            return []
        return [f"{self.label}: adapter_config.json names the base `{named}`, but it is applied to "
                f"`{self._base.label}`"]

    def close(self) -> None:
        self._adapter.close()
        if self.owns_base:
            self._base.close()


def _weight_of(mods: dict[str, dict], module: str) -> str | None:
    return next((target for target, e in mods.items() if e["module"] == module), None)


def _same_model(named: str, label: str) -> bool:
    """Whether an adapter's recorded base and the base it is applied to are the same model, as far as the
    references tell: the same local folder, or the same repo (revisions and local copies named like it)."""
    label = label.split("+")[0]
    if os.path.exists(named) and os.path.exists(label):
        return os.path.realpath(named) == os.path.realpath(label)

    def tail(ref: str) -> str:
        return os.path.basename(os.path.normpath(ref.split("@")[0])).lower()

    return tail(named) == tail(label)
