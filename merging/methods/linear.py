"""Weighted averages of whole weights (model soups) and of task vectors (task arithmetic)."""

from __future__ import annotations

import torch

from ..native import ops
from .coefficients import (
    COEFFICIENT_PARAMS,
    NAN_NORMS_PASS,
    model_weights,
    nan_reduce,
    needs_model_norms,
    weights_known,
)
from .lines import LINES_PARAMS, lines_scale, make_reduce, needs_reduction
from .registry import MergeMethod, Param, Preset, TensorContext, register

WEIGHT = Param("weight", float, 1.0, "how much this model counts (negative values subtract it)", per_model=True)


def _stacked_weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(weights, dtype=like.dtype, device=like.device).view(-1, *([1] * like.dim()))


def _soup_divisor(weights: list[float], params: dict) -> float:
    total = sum(weights)
    return (total if abs(total) > 1e-8 else 1.0) if params["normalize"] else 1.0


def linear(base: torch.Tensor | None, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Model soup (Wortsman et al. 2022): θ = Σ w_i θ_i, divided by Σ w_i when ``normalize``
    (w_i = NAN's α_i with ``coefficients: nan``)."""
    weights = model_weights(base, models, params, ctx)
    merged = torch.zeros_like(models[0])
    for w, theta in zip(weights, models):
        merged.add_(theta, alpha=w)
    divisor = _soup_divisor(weights, params)
    if divisor != 1.0:
        merged.div_(divisor)
    return merged


def linear_native(base, models, params, ctx, out_dtype):
    """``linear`` as one fused pass over the stored inputs (merging/native)."""
    if not weights_known(params, ctx):
        return None
    weights = model_weights(None, models, params, ctx)
    return ops.weighted_sum(models, weights, out_dtype, _soup_divisor(weights, params))


def task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): θ = θ_base + λ Σ w_i τ_i with τ_i = θ_i − θ_base
    (divided by Σ w_i when ``normalize``; w_i = NAN's α_i with ``coefficients: nan``).

    Computed as θ = (1 − Σ c_i) θ_base + Σ c_i θ_i with c_i = λ w_i (/ Σ w_i): the same sum, rearranged so that
    each input is read once by one fused multiply-add and no task vector is materialized.
    """
    coefficients = _task_coefficients(model_weights(base, models, params, ctx), params, lines_scale(params, ctx,
                                                                                                    len(models)))
    merged = base * (1.0 - sum(coefficients))
    for c, theta in zip(coefficients, models):
        merged.add_(theta, alpha=c)
    return merged


def _task_coefficients(weights: list[float], params: dict, depth_scale: float = 1.0) -> list[float]:
    """c_i = λ w_i (/ Σ w_i when ``normalize``), times LiNeS' λ(ℓ) when on: each model's share in
    θ = (1 − Σ c_i) θ_base + Σ c_i θ_i."""
    scale = params["lambda"] * depth_scale
    if params["normalize"]:
        total = sum(weights)
        scale /= total if abs(total) > 1e-8 else 1.0
    return [scale * w for w in weights]


def task_arithmetic_native(base, models, params, ctx, out_dtype):
    """``task_arithmetic`` as one fused pass over the stored inputs (merging/native)."""
    if not weights_known(params, ctx):
        return None
    coefficients = _task_coefficients(model_weights(None, models, params, ctx), params,
                                      lines_scale(params, ctx, len(models)))
    return ops.weighted_sum([base, *models], [1.0 - sum(coefficients), *coefficients], out_dtype)


register(MergeMethod(
    name="linear", fn=linear,
    summary="weighted average of the models' weights (model soup)",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    params=(WEIGHT, Param("normalize", bool, True, "divide by the sum of the weights"), *COEFFICIENT_PARAMS),
    presets=(Preset("paper", "uniform soup: every weight 1, normalized (Wortsman et al.)",
                    {"weight": 1.0, "normalize": True}),),
    base="optional", min_models=1, reduce=nan_reduce, reduce_needed=needs_model_norms,
    elementwise=True, stats=(NAN_NORMS_PASS,), native=linear_native,
))

register(MergeMethod(
    name="task_arithmetic", fn=task_arithmetic,
    summary="adds the weighted sum of task vectors (fine-tune minus base) to the base",
    paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    params=(WEIGHT, Param("lambda", float, 1.0, "scales the merged task vector"),
            Param("normalize", bool, False, "divide the sum of task vectors by the sum of the weights"),
            *COEFFICIENT_PARAMS, *LINES_PARAMS),
    presets=(Preset("paper", "vision, 8 tasks: λ = 0.3 (Ilharco et al.)", {"weight": 1.0, "lambda": 0.3}),
             Preset("two_tasks", "two tasks: λ = 0.8 (Ilharco et al.)", {"weight": 1.0, "lambda": 0.8}),
             Preset("lines", "with LiNeS: λ = 1, α = 1/N from the norms, β = 0.5 (Wang et al. 2025; β tuned on "
                             "validation there)", {"lambda": 1.0, "lines": "on", "lines_alpha_from": "norm_ratio",
                                                   "lines_beta": 0.5})),
    base="required", min_models=1, reduce=make_reduce(task_arithmetic), reduce_needed=needs_reduction,
    elementwise=True, stats=(NAN_NORMS_PASS,), native=task_arithmetic_native,
))
