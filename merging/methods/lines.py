"""LiNeS, a plug-in on any task-vector method: scale the merged task vector by depth.

Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging" (ICLR,
arXiv:2410.17146), Eq. 1: the update of block ℓ (0-based, of L) is scaled by

    λ(ℓ) = α + β · ℓ / (L − 1),     θ = θ_base + λ(ℓ) · τ_merged^(ℓ),

so shallow blocks stay near the pre-trained weights and deep ones keep the task-specific update; tensors outside
the blocks (embeddings, final norm, head) get α, as the official code's scaling does. For multi-task merging the
paper sets α from the norms, α = ‖Σ_i τ_i‖₁ / (N · ‖τ_merged‖₁) over the whole model (1/N for task arithmetic, where
τ_merged = Σ_i τ_i), and tunes β on validation; ``lines_alpha_from: value`` takes ``lines_alpha`` as given.

Here τ_merged is the method's merged task vector as configured (its ``lambda`` included: set ``lambda: 1`` for the
paper's unscaled τ_MTL), so ``lines: on`` multiplies the method's λ by λ(ℓ) per tensor; the whole-model norms come
from the engine's reduction pass (``nan_reduce``'s layout, ``coefficients.plugin_totals``), for which a tensor is
merged once more at λ = 1 with LiNeS off.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .coefficients import nan_reduce, needs_model_norms, ordered_sum, plugin_totals, uses_model_norms
from .registry import Param, TensorContext

PAPER = ("Wang et al. 2025, LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging "
         "(ICLR, arXiv:2410.17146)")

LINES_PARAMS: tuple[Param, ...] = (
    Param("lines", str, "off", "LiNeS (Wang et al. 2025): scale the merged task vector of block ℓ of L by "
          "λ(ℓ) = α + β·ℓ/(L−1)", choices=("off", "on")),
    Param("lines_alpha_from", str, "norm_ratio", "with LiNeS: α = ‖Σ τ_i‖₁ / (N ‖τ_merged‖₁) over the model "
          "(`norm_ratio`, the paper's multi-task rule; one more pass) or `value` (lines_alpha)",
          choices=("norm_ratio", "value")),
    Param("lines_alpha", float, 0.0, "with LiNeS and lines_alpha_from: value: the scale of the first block and of the "
          "tensors outside the blocks", min=0.0),
    Param("lines_beta", float, 0.5, "with LiNeS: how much more the last block is scaled than the first (the paper "
          "tunes it on validation)", min=0.0),
)


def lines_on(params: dict[str, Any]) -> bool:
    return params.get("lines", "off") == "on"


def _norm_ratio(params: dict[str, Any]) -> bool:
    return lines_on(params) and params.get("lines_alpha_from", "norm_ratio") == "norm_ratio"


def lines_scale(params: dict[str, Any], ctx: TensorContext, n_models: int) -> float:
    """λ(ℓ) for this tensor (1 with LiNeS off)."""
    if not lines_on(params):
        return 1.0
    if _norm_ratio(params):
        summed, merged = (float(v) for v in plugin_totals(n_models, ctx)["lines"])
        alpha = summed / (n_models * merged) if merged > 0 else 1.0 / n_models
    else:
        alpha = params["lines_alpha"]
    layers = ctx.num_layers or 0
    if ctx.layer is None or layers < 2:
        return alpha
    return alpha + params["lines_beta"] * min(ctx.layer, layers - 1) / (layers - 1)


def make_reduce(merge_fn):
    """The family's ``reduce``: NAN's norms (``nan_reduce``) and, for LiNeS' ``norm_ratio``, this tensor's share of
    ‖Σ_i τ_i‖₁ and of ‖τ_merged‖₁ (``merge_fn`` at λ = 1 with LiNeS off, minus the base)."""
    def reduce(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
        part = nan_reduce(base, models, params, ctx)
        if _norm_ratio(params):
            summed = sum(m - base for m in models)
            merged = merge_fn(base, models, {**params, "lambda": 1.0, "lines": "off"}, ctx) - base
            part[-2] = float(ordered_sum(summed.abs()))
            part[-1] = float(ordered_sum(merged.abs()))
        return part
    return reduce


def needs_reduction(plan: Any) -> bool:
    """``reduce_needed``: NAN's whole-model or per-layer norms, or LiNeS' norm ratio, anywhere in the plan; refuses
    the one combination the single reduction pass cannot give (the norm ratio needs the merge, which then needs
    NAN's totals)."""
    merged = [t for t in plan.tasks if not t.copy]
    for task in merged:
        if _norm_ratio(task.params) and uses_model_norms(task.params):
            raise ConfigError(f"{task.name}: LiNeS' `lines_alpha_from: norm_ratio` cannot be combined with NAN's "
                              "`nan_scope: model` or `layer` (set `lines_alpha_from: value`)")
    return needs_model_norms(plan) or any(_norm_ratio(t.params) for t in merged)


def reduce_stats(params: dict[str, Any]) -> bool:
    """``reduce_stats``: a tensor's reduction merges it (LiNeS' norm ratio), so it needs its statistics passes."""
    return _norm_ratio(params)
