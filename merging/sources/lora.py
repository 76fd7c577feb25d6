"""A PEFT LoRA adapter seen as a full checkpoint: each target module becomes W + scale · B @ A.

With ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA; per-module ``rank_pattern`` and
``alpha_pattern`` honoured), a LoRA fine-tune merges exactly like the full fine-tune it stands for.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import SourceError
from .base import CheckpointSource, TensorSpec
from .safetensors_files import LocalFile, SafetensorsCheckpoint

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


class LoraCheckpoint(CheckpointSource):
    def __init__(self, adapter_dir: str, base: CheckpointSource) -> None:
        self.label = adapter_dir
        self._base = base
        root = Path(adapter_dir)
        try:
            cfg = json.loads((root / "adapter_config.json").read_text())
        except (OSError, ValueError):
            raise SourceError(f"{adapter_dir}: adapter_config.json cannot be read as JSON") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise SourceError(f"{adapter_dir}: PEFT type {cfg.get('peft_type')!r} is not supported (only LORA)")
        weights = root / "adapter_model.safetensors"
        if not weights.is_file():
            if (root / "adapter_model.bin").is_file():
                raise SourceError(f"{adapter_dir}: the adapter is a PyTorch pickle (adapter_model.bin); save it "
                                  "with safe_serialization=True")
            raise SourceError(f"{adapter_dir}: adapter_model.safetensors is missing")
        self._adapter = SafetensorsCheckpoint(adapter_dir, {"adapter_model.safetensors": LocalFile(str(weights))})
        self._cfg = cfg
        self._fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        base_specs = base.specs()
        self._pairs: dict[str, dict[str, str]] = {}  # base tensor name -> {"A": key, "B": key, "embedding": bool}
        self._replaced: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save)
        for key in self._adapter.specs():
            short = key.removeprefix(_PREFIX)
            m = _LORA_KEY.match(short)
            if m:
                target = f"{m['module']}.weight"
                if target not in base_specs:
                    raise SourceError(f"{adapter_dir}: adapter targets {m['module']!r}, which the base "
                                      f"{base.label} does not have")
                entry = self._pairs.setdefault(target, {"module": m["module"]})
                entry["A" if m["kind"].endswith("A") else "B"] = key
                entry["embedding"] = "embedding" in m["kind"]
            elif short in base_specs:
                self._replaced[short] = key
            else:
                raise SourceError(f"{adapter_dir}: adapter tensor {key!r} matches nothing in the base {base.label}")
        for entry in self._pairs.values():
            if "A" not in entry or "B" not in entry:
                raise SourceError(f"{adapter_dir}: module {entry['module']!r} has only one of lora_A / lora_B")

    def specs(self) -> dict[str, TensorSpec]:
        return self._base.specs()

    def _scale(self, module: str, rank: int) -> float:
        r = _pattern_value(self._cfg.get("rank_pattern") or {}, module, self._cfg.get("r", rank))
        alpha = _pattern_value(self._cfg.get("alpha_pattern") or {}, module, self._cfg.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self._cfg.get("use_rslora") else alpha / r

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self._replaced:
            return self._adapter.read(self._replaced[name], rows)
        weight = self._base.read(name, rows)
        entry = self._pairs.get(name)
        if entry is None:
            return weight
        a = self._adapter.read(entry["A"]).float()
        b = self._adapter.read(entry["B"]).float()
        if entry["embedding"]:
            delta = (b @ a).T  # PEFT stores embedding factors as A: (r, vocab), B: (dim, r)
        else:
            delta = b @ a
            if self._fan_in_fan_out:
                delta = delta.T
        if rows is not None:
            delta = delta[rows[0]:rows[1]]
        if delta.shape != weight.shape:
            raise SourceError(f"{self.label}: LoRA update for {name!r} has shape {list(delta.shape)}, the base "
                              f"tensor {list(weight.shape)}")
        rank = a.shape[0] if not entry["embedding"] else a.shape[0]
        return (weight.float() + self._scale(entry["module"], rank) * delta).to(weight.dtype)

    def bytes_read(self) -> int:
        return self._adapter.bytes_read()

    def file_names(self) -> list[str]:
        return self._base.file_names()

    def read_file(self, filename: str) -> bytes | None:
        return self._base.read_file(filename)

    def close(self) -> None:
        self._adapter.close()


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return value
    return default
