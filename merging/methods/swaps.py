"""Two-model merges that take the other model's value only where it differs little or matters most: NearSwap and
Arcee Fusion (mergekit 0.1.5's semantics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import MergeMethod, Param, TensorContext, register


def nearswap(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """NearSwap: per element w = clip(t / max(|θ_base − θ_1|, 1e-6), 0, 1) and θ = w θ_1 + (1 − w) θ_base: entries
    where the two models are within t take the other model's value, the rest move toward it by t / |difference|."""
    other = models[0]
    weight = (params["t"] / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


QUANTILES = (0.25, 0.5, 0.75)


def fusion_importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance: |θ − θ_base| times, per row (the last dimension; a 1-D tensor is one row), the KL
    divergence KL(softmax(θ) ‖ softmax(θ_base)), each softmax plus 1e-8."""
    p = F.softmax(theta, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (theta - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · (q3 − q1) of the importance, each quantile the sorted value at index ⌊q · (n − 1)⌋ (mergekit's
    rule), found by selection. mergekit estimates them from a random sample of 10⁶ above that size; these are the
    exact order statistics at every size, so the result is deterministic."""
    flat = importance.reshape(-1)
    indices = (torch.tensor(QUANTILES) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in indices)
    return median + 1.5 * (q3 - q1)  # in the tensor's dtype, as mergekit computes it


def arcee_fusion(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Arcee Fusion: θ = θ_base + (θ_1 − θ_base) · [importance ≥ threshold], see ``fusion_importance`` and
    ``fusion_threshold``: only the outliers of importance (above the upper Tukey fence) are taken."""
    theta = models[0]
    importance = fusion_importance(theta, base)
    return base + (theta - base) * (importance >= fusion_threshold(importance)).to(base.dtype)


register(MergeMethod(
    name="nearswap", fn=nearswap,
    summary="takes the other model's value where the two are within t, moves toward it elsewhere by t / |difference|",
    paper="alchemonaut 2024, NearSwap (mergekit; huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
    params=(Param("t", float, 0.0001, "the distance under which the other model's value is taken", min=0.0),),
    base="required", min_models=1, max_models=1, elementwise=True, ignored=("weight",),
))

register(MergeMethod(
    name="arcee_fusion", fn=arcee_fusion,
    summary="takes the other model's change only at its most important entries (|Δ| × per-row KL, above the "
            "upper Tukey fence)",
    paper="Arcee AI 2024, Arcee Fusion (mergekit's arcee_fusion)",
    params=(), base="required", min_models=1, max_models=1, ignored=("weight",),
))
