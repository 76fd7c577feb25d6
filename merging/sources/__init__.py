"""Where tensors come from. ``open_sources`` turns a config's model references into CheckpointSources.

A reference is a local path, a Hub repo id (through the resolver), or mergekit's ``model+lora``: a PEFT adapter
applied to the model before the ``+`` rather than to the config's base. Per-expert MoE checkpoints of the families
transformers 5 fuses are seen fused (``views.fuse_experts``), as mergekit merges them.
"""

from __future__ import annotations

import os

from ..errors import SourceError
from .base import CheckpointSource, TensorSpec
from .local import is_lora_adapter, open_local, read_json_file
from .lora import LoraCheckpoint
from .views import fuse_experts

__all__ = ["CheckpointSource", "TensorSpec", "open_source", "open_sources", "read_json_file", "SourceError",
           "split_lora_ref"]


def split_lora_ref(ref: str) -> tuple[str, str] | None:
    """``model+lora`` → (model, lora); None for a plain reference (an existing path is never split)."""
    if "+" not in ref or os.path.exists(ref):
        return None
    model, _, lora = ref.partition("+")
    if not model or not lora or "+" in lora:
        raise SourceError(f"{ref}: a `model+lora` reference needs exactly one model and one adapter")
    return model, lora


def open_source(ref: str, *, allow_pickle: bool = False, base: CheckpointSource | None = None,
                resolver=None) -> CheckpointSource:
    """Open one model reference. ``resolver`` may map references that are not local paths (Hub repos)."""
    src = _open_raw(ref, allow_pickle=allow_pickle, base=base, resolver=resolver)
    try:
        return fuse_experts(src, read_json_file(src, "config.json"))
    except BaseException:
        src.close()
        raise


def _open_raw(ref: str, *, allow_pickle: bool, base: CheckpointSource | None, resolver) -> CheckpointSource:
    pair = split_lora_ref(ref)
    if pair is not None:
        model = _open_raw(pair[0], allow_pickle=allow_pickle, base=None, resolver=resolver)
        try:
            adapter = _open_raw(pair[1], allow_pickle=allow_pickle, base=model, resolver=resolver)
        except BaseException:
            model.close()
            raise
        if not isinstance(adapter, LoraCheckpoint):
            model.close()
            adapter.close()
            raise SourceError(f"{ref}: {pair[1]} is not a PEFT adapter (no adapter_config.json)")
        adapter.label = ref
        adapter.owns_base = True
        return adapter
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
    """Open every reference once, the base first (LoRA adapters are applied on top of it, before any view)."""
    raw: dict[str, CheckpointSource] = {}
    try:
        if base_ref is not None:
            raw[base_ref] = _open_raw(base_ref, base=None, **_raw_kwargs(kwargs))
        for ref in refs:
            if ref not in raw:
                raw[ref] = _open_raw(ref, base=raw.get(base_ref) if base_ref else None, **_raw_kwargs(kwargs))
        return {ref: fuse_experts(src, read_json_file(src, "config.json")) for ref, src in raw.items()}
    except BaseException:
        for src in raw.values():
            src.close()
        raise


def _raw_kwargs(kwargs: dict) -> dict:
    return {"allow_pickle": kwargs.get("allow_pickle", False), "resolver": kwargs.get("resolver")}
