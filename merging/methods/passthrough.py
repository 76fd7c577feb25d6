"""Passthrough: tensors copied unchanged, the building block of layer-stacking "frankenmerges"."""

from __future__ import annotations

import torch

from .registry import MergeMethod, Param, TensorContext, register


def passthrough(base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
                ctx: TensorContext) -> torch.Tensor:
    """θ = θ_1: the one input, unchanged, or times its ``scale`` when one is set (mergekit's, e.g. 0 to silence a
    layer's output projection in a frankenmerge).

    With ``slices`` the planner does the real work: it lays the chosen layer ranges of each source one after
    another, renumbers them, copies their tensors verbatim (this function is not even called for a tensor without
    a scale) and writes the new layer count into ``config.json``. Without slices it copies the one model given (a
    dtype conversion).
    """
    scale = params.get("scale", [None])[0] if params.get("scale") else None
    return models[0] if scale is None else models[0] * scale


register(MergeMethod(
    name="passthrough", fn=passthrough,
    summary="copies tensors unchanged; with `slices`, stacks layer ranges from several models (frankenmerge)",
    paper="mergekit (Goddard et al. 2024, arXiv:2403.13257); e.g. SOLAR's depth up-scaling (arXiv:2312.15166)",
    params=(Param("scale", float, None, "multiply this input's tensors by this factor (unset: copied unchanged); "
                  "per source with `slices`, filters allowed", per_model=True),),
    # min 0: with `slices` the inputs are the slices' sources, not `models` (one per slice, taken from the first).
    base="none", min_models=0, max_models=1,
))
