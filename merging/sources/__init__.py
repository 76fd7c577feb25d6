"""Where tensors come from. ``open_sources`` turns a config's model references into CheckpointSources."""

from __future__ import annotations

from ..errors import SourceError
from .base import CheckpointSource, TensorSpec
from .local import is_lora_adapter, open_local, read_json_file
from .lora import LoraCheckpoint

__all__ = ["CheckpointSource", "TensorSpec", "open_source", "open_sources", "read_json_file", "SourceError"]


def open_source(ref: str, *, allow_pickle: bool = False, base: CheckpointSource | None = None,
                resolver=None) -> CheckpointSource:
    """Open one model reference. ``resolver`` may map references that are not local paths (Hub repos)."""
    import os

    if os.path.exists(ref):
        if is_lora_adapter(ref):
            if base is None:
                raise SourceError(f"{ref}: a LoRA adapter needs the config's `base_model` to apply to")
            return LoraCheckpoint(ref, base)
        return open_local(ref, allow_pickle=allow_pickle)
    if resolver is not None:
        return resolver(ref, allow_pickle=allow_pickle, base=base)
    raise SourceError(f"{ref}: no such file or folder")


def open_sources(refs: list[str], base_ref: str | None, **kwargs) -> dict[str, CheckpointSource]:
    """Open every reference once, the base first (LoRA adapters are applied on top of it)."""
    opened: dict[str, CheckpointSource] = {}
    try:
        if base_ref is not None:
            opened[base_ref] = open_source(base_ref, **kwargs)
        for ref in refs:
            if ref not in opened:
                opened[ref] = open_source(ref, base=opened.get(base_ref) if base_ref else None, **kwargs)
    except BaseException:
        for src in opened.values():
            src.close()
        raise
    return opened
