"""Ways to choose the per-model weights of a weighted merge: as given, or NAN.

NAN (Si et al. 2025, "NAN: A Training-Free Solution to Coefficient Estimation in Model Merging",
arXiv:2505.16148) derives, from a least-squares view of merging, that a model's weight should grow with the amount
of data it was fine-tuned on, and proxies that amount by the inverse norm of its parameters:

    α_i = (1 / ‖x_i‖_F) / Σ_j (1 / ‖x_j‖_F),   so that Σ_i α_i = 1.

The paper's code is not public and its text leaves two choices open; this module implements both readings and
says which one is the default:

- ``nan_on: weights`` (default) takes x_i = θ_i, the model's weights, as the paper's formula is written;
  ``nan_on: task_vector`` takes x_i = τ_i = θ_i − θ_base, the fine-tuning update.
- ``nan_scope: tensor`` (default) computes the norms per tensor, so every tensor gets its own α;
  ``nan_scope: layer`` sums them over the tensors of one block (``layers.N.``; the tensors outside the blocks form
  one more group), ``nan_scope: model`` over the whole model, ‖x_i‖_F² = Σ_tensors ‖x_i,t‖_F²; both are gathered by
  the engine's reduction pass before the merge (positional: with ``slices``, input k of every slice counts as
  model k).

With ``nan_on: weights`` (the default) and fine-tunes of one base, ‖θ_i‖ differ by the task vectors only, a few
parts in a thousand: α_i ≈ 1/N for every model, so NAN cannot change such a merge (the zoo table's NAN rows equal
plain task arithmetic); ``nan_on: task_vector`` is the reading that moves the weights.

``parameters: {coefficients: nan}`` switches it on for every weighted method (linear, task_arithmetic, ties,
dare_*, breadcrumbs*, della*): α_i replaces the per-model ``weight`` (any given weight is ignored), and the method's
``lambda`` still scales the merged task vector. A model whose norm is zero (a tensor its fine-tune never changed,
with ``nan_on: task_vector``) adds nothing whatever its weight, so it gets α = 0 and the others share the sum;
if every norm is zero the weights are uniform.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .registry import Param, StatsPass, TensorContext

COEFFICIENT_PARAMS: tuple[Param, ...] = (
    Param("coefficients", str, "weights",
          "per-model weights: `weights` as given, or `nan` (∝ 1/‖θ_i‖, Si et al. 2025) replacing them",
          choices=("weights", "nan")),
    Param("nan_scope", str, "tensor", "with NAN: norms per `tensor`, per `layer` (block) or over the whole `model` "
          "(the last two: one more pass)", choices=("tensor", "layer", "model")),
    Param("nan_on", str, "weights", "with NAN: the norm of each model's `weights` θ_i or its `task_vector` τ_i",
          choices=("weights", "task_vector")),
)


_BLOCK = 1024


def ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ x over all entries, in an order that does not depend on the number of threads.

    ``tensor.sum()`` splits a large reduction among threads, so its rounding changes with the thread count; a
    per-row sum of a (rows, 1024) view is split by rows, each row summed by one thread in a fixed order. Summing
    blocks of 1024, then blocks of the block totals, keeps the same accuracy and makes every bit reproducible.
    """
    flat = x.reshape(-1)
    while flat.numel() > _BLOCK:
        whole = flat.numel() // _BLOCK * _BLOCK
        partial = flat[:whole].view(-1, _BLOCK).sum(dim=1)
        if whole < flat.numel():
            partial = torch.cat([partial, flat[whole:].sum().reshape(1)])
        flat = partial
    return flat.sum()


def nan_coefficients(norms: torch.Tensor) -> list[float]:
    """α_i = (1/‖x_i‖) / Σ_j (1/‖x_j‖) for the given norms; zero norms get α = 0 (all zero: uniform)."""
    norms = norms.to(torch.float64).cpu()
    nonzero = norms > 0
    if not bool(nonzero.any()):
        return [1.0 / len(norms)] * len(norms)
    inverse = torch.where(nonzero, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    return (inverse / inverse.sum()).tolist()


def squared_norms(base: torch.Tensor | None, models: list[torch.Tensor], on: str, where: str) -> torch.Tensor:
    """‖x_i‖_F² for each model, in float64, with x_i = θ_i (``on="weights"``) or τ_i = θ_i − θ_base."""
    if on == "task_vector":
        if base is None:
            raise ConfigError(f"{where}: `nan_on: task_vector` needs a `base_model`")
        vectors = [theta - base for theta in models]
    else:
        vectors = models
    return torch.stack([ordered_sum(x.square()).to(torch.float64) for x in vectors]).cpu()


def uses_model_norms(params: dict[str, Any]) -> bool:
    """Whether NAN's norms come from the reduction pass (``nan_scope: model`` or ``layer``)."""
    return params.get("coefficients") == "nan" and params.get("nan_scope") in ("model", "layer")


def layer_slot(ctx: TensorContext) -> int:
    """The tensor's group for ``nan_scope: layer``: its block index, or ``num_layers`` outside the blocks."""
    layers = ctx.num_layers or 0
    return ctx.layer if ctx.layer is not None and ctx.layer < layers else layers


def reduced_length(n: int, ctx: TensorContext) -> int:
    """The length of the plug-ins' reduction vector for ``n`` models (see ``plugin_totals``)."""
    return n * (2 + (ctx.num_layers or 0)) + 2


def plugin_totals(n: int, ctx: TensorContext) -> dict[str, torch.Tensor]:
    """The plug-ins' whole-model totals, read from ``ctx.reduced``, laid out as ``nan_reduce`` writes them:
    [N: NAN's whole-model ‖x_i‖² | N·(L+1): its per-block ‖x_i‖², the last group outside the blocks | 2: LiNeS'
    ‖Σ_i τ_i‖₁ and ‖τ_merged‖₁]."""
    reduced = ctx.reduced
    if reduced is None or len(reduced) != reduced_length(n, ctx):
        raise ConfigError(f"{ctx.name}: NAN's whole-model or per-layer norms need every tensor merged from the same "
                          "number of models (and the engine's reduction pass)")
    slot = layer_slot(ctx)
    return {"model": reduced[:n], "layer": reduced[n * (1 + slot):n * (2 + slot)], "lines": reduced[-2:]}


def model_weights(base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any],
                  ctx: TensorContext) -> list[float]:
    """The per-model weights a weighted method uses for this tensor: ``weight`` as resolved, or NAN's α."""
    if params.get("coefficients", "weights") != "nan":
        return list(params["weight"])
    if params["nan_scope"] in ("model", "layer"):
        return nan_coefficients(plugin_totals(len(models), ctx)[params["nan_scope"]].sqrt())
    if ctx.stats and "nan_squared_norms" in ctx.stats:  # gathered over the tensor's bands by NAN_NORMS_PASS
        return nan_coefficients(ctx.stats["nan_squared_norms"].sqrt())
    return nan_coefficients(squared_norms(base, models, params["nan_on"], ctx.name).sqrt())


def weights_known(params: dict[str, Any], ctx: TensorContext) -> bool:
    """Whether ``model_weights`` can answer from the parameters and the gathered norms alone, without the tensors
    (what a fused kernel, which never holds float32 copies, needs)."""
    if params.get("coefficients", "weights") != "nan":
        return True
    if params["nan_scope"] in ("model", "layer"):
        return ctx.reduced is not None
    return bool(ctx.stats) and "nan_squared_norms" in ctx.stats


def _uses_tensor_norms(params: dict[str, Any]) -> bool:
    return params.get("coefficients") == "nan" and params.get("nan_scope", "tensor") == "tensor"


# Per-tensor NAN when a method runs band by band: each band's share of ‖x_i‖², summed by the engine.
NAN_NORMS_PASS = StatsPass(
    collect=lambda base, models, params, ctx: {
        "nan_squared_norms": squared_norms(base, models, params["nan_on"], ctx.name)},
    finish=lambda combined, params, ctx: {**(ctx.stats or {}), **combined},
    needed=_uses_tensor_norms,
)


def nan_reduce(base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any],
               ctx: TensorContext) -> torch.Tensor:
    """The reduction pass of whole-model and per-layer NAN: this tensor's share of each ‖x_i‖_F², in the layout of
    ``plugin_totals`` (zeros where not needed)."""
    n = len(models)
    part = torch.zeros(reduced_length(n, ctx), dtype=torch.float64)
    if uses_model_norms(params):
        norms = squared_norms(base, models, params["nan_on"], ctx.name)
        start = 0 if params["nan_scope"] == "model" else n * (1 + layer_slot(ctx))
        part[start:start + n] = norms
    return part


def needs_model_norms(plan: Any) -> bool:
    """Whether a plan asks for whole-model NAN anywhere, i.e. whether the engine must run the reduction pass."""
    return any(uses_model_norms(task.params) for task in plan.tasks if not task.copy)
