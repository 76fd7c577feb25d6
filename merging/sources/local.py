"""Checkpoints on the local disk: a safetensors file, a transformers folder (single or sharded), a PEFT LoRA
adapter, or (only when asked) a PyTorch pickle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import SourceError
from ..safetensors_io import DTYPE_NAMES
from .base import CheckpointSource, TensorSpec
from .safetensors_files import LocalFile, SafetensorsCheckpoint, shard_files_from_index

# Side files copied from the reference into a merged checkpoint: the config, the generation config, and every
# tokenizer and processor file a repo ships (fast and slow tokenizers, SentencePiece and tiktoken models, BPE vocab
# and merges, WordPiece vocab, added and special tokens, chat templates, image/audio/video processors).
SIDE_FILES = ("config.json", "generation_config.json")
_SIDE_PATTERN = re.compile(
    r"^(?:[\w.-]*token[\w.-]*\.(?:json|model|txt)|[\w.-]*\.(?:model|tiktoken)|[\w.-]*vocab[\w.-]*\.(?:json|txt)"
    r"|merges\.txt|[\w.-]*chat_template[\w.-]*\.(?:jinja|json)|(?:pre)?processor_config\.json"
    r"|[\w-]*(?:image|video|audio)_processor[\w.-]*\.json|feature_extractor_config\.json"
    r"|[\w-]*preprocessor_config\.json|spiece\.model|bpe\.codes|qwen\.tiktoken)$")
_NOT_SIDE = ("adapter_config.json", "training_args", "trainer_state", "optimizer", "scheduler", "rng_state")


def is_side_file(name: str) -> bool:
    """Whether a top-level file of a checkpoint is copied into merged outputs (config, tokenizer, processor)."""
    if "/" in name or name.startswith(".") or any(bad in name for bad in _NOT_SIDE):
        return False
    return name in SIDE_FILES or bool(_SIDE_PATTERN.match(name))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
PICKLE_HINT = ("PyTorch pickles can run arbitrary code when loaded, so they are refused; convert the checkpoint "
               "to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True)), or pass "
               "--allow-pickle to load it with torch.load(weights_only=True)")


def open_local(path: str, *, allow_pickle: bool = False) -> CheckpointSource:
    """Open a local checkpoint (file or folder); LoRA adapters are returned unresolved (see ``is_lora_adapter``)."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(path, {"": LocalFile(str(p))})
        if p.suffix in PICKLE_SUFFIXES:
            return _open_pickle(path, [p], allow_pickle)
        raise SourceError(f"{path}: not a .safetensors file or a checkpoint folder")
    if not p.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    side = {f.name: _file_loader(f) for f in sorted(p.iterdir()) if f.is_file() and is_side_file(f.name)}
    if (p / INDEX_NAME).is_file():
        files = shard_files_from_index((p / INDEX_NAME).read_bytes(), path)
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
            raise SourceError(f"{path}: the index lists shard files that are missing: {', '.join(missing[:5])}")
        return SafetensorsCheckpoint(path, {f: LocalFile(str(p / f)) for f in files}, side)
    if (p / "model.safetensors").is_file():
        return SafetensorsCheckpoint(path, {"model.safetensors": LocalFile(str(p / "model.safetensors"))}, side)
    tensors = sorted(f.name for f in p.glob("*.safetensors"))
    if tensors:
        return SafetensorsCheckpoint(path, {f: LocalFile(str(p / f)) for f in tensors}, side)
    pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        return _open_pickle(path, pickles, allow_pickle, side)
    raise SourceError(f"{path}: the folder holds no .safetensors weights")


def is_lora_adapter(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def _file_loader(path: Path):
    return lambda: path.read_bytes()


class InMemoryCheckpoint(CheckpointSource):
    """Tensors already in memory (pickles loaded with weights_only, test fixtures)."""

    def __init__(self, label: str, tensors: dict[str, torch.Tensor], side: dict | None = None) -> None:
        self.label = label
        self._tensors = tensors
        self._side = side or {}

    def specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in self._tensors.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self._tensors:
            raise SourceError(f"{self.label}: has no tensor {name!r}")
        t = self._tensors[name]
        return t if rows is None else t[rows[0]:rows[1]]

    def file_names(self) -> list[str]:
        return sorted(self._side)

    def read_file(self, filename: str) -> bytes | None:
        loader = self._side.get(filename)
        return loader() if loader else None


def _open_pickle(label: str, files: list[Path], allow_pickle: bool, side: dict | None = None) -> CheckpointSource:
    if not allow_pickle:
        raise SourceError(f"{label}: holds PyTorch pickle weights ({files[0].name}). {PICKLE_HINT}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise SourceError(f"{label}: {f.name} could not be loaded with weights_only=True "
                              f"({exc.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise SourceError(f"{label}: {f.name} is not a state dict")
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dtype in DTYPE_NAMES:
                tensors[str(k)] = v
    if not tensors:
        raise SourceError(f"{label}: the pickle holds no tensors")
    return InMemoryCheckpoint(label, tensors, side)


def read_json_file(source: CheckpointSource, filename: str) -> dict | None:
    raw = source.read_file(filename)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise SourceError(f"{source.label}: {filename} is not valid JSON") from None
    return value if isinstance(value, dict) else None

