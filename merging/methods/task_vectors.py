"""The task-vector family: sparsify each task vector, optionally elect a sign, then a weighted (disjoint) sum.

One generalized function covers every method here (mergekit's "generalized task arithmetic"); the methods differ
only in how each τ_i is sparsified, whether a sign is elected and their defaults:

    τ_i = θ_i − θ_base
    δ_i = w_i · sparsify(τ_i)
    without consensus:  Δ = Σ_i δ_i,                      divisor = Σ_i w_i
    with consensus:     s = sign(Σ_i δ_i) (0 counts as +),  m_i = [sign(δ_i) = s]
                        Δ = Σ_i m_i δ_i,                   divisor = Σ_i m_i w_i   (the disjoint mean)
    θ = θ_base + λ · Δ / divisor   (the division only when ``normalize``; a zero divisor counts as 1)

The defaults are mergekit's, so a mergekit config gives the same bytes; each paper's own semantics is an option
and its "paper" preset (``methods.sparsify`` has the details):

- TIES (Yadav et al. 2023, §3): ``topk_scope: model`` trims over the whole flattened task vector (keep |τ_i| ≥
  its k-th largest value, ties kept, as the official code) instead of per tensor; ``merge: sum`` is the official
  code's disjoint sum (used with λ = 0.3 in the ViT protocol), ``mean`` the disjoint mean of Eq. 3. The official
  code elects the majority sign where Σ τ = 0 exactly; this module keeps mergekit's + (a measure-zero difference).
- DARE (Yu et al. 2024, Eq. 2) and DELLA (Deep et al. 2024, Eq. 3): ``rescale: inverse_keep`` divides each survivor
  by its keep probability (unbiased); ``rescale: l1`` (or ``true``, mergekit's) rescales the sparsified task vector
  to the original's L1 norm, which keeps the expected magnitude per tensor but is biased element by element.
- NAN (``coefficients``) and LiNeS (``lines``) are plug-ins: per-model weights and a per-block scale of λ.

DARE's random masks hash (seed, tensor name, model, element position) (``merging/native/rng.py``), DELLA's draw from
``ctx.generator()`` seeded by (seed, tensor name, band): the same config gives the same bytes in any order and on
any number of threads.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ..errors import ConfigError
from ..native import ops, rng
from .coefficients import COEFFICIENT_PARAMS, NAN_NORMS_PASS, model_weights, weights_known
from .global_topk import global_topk_passes
from .lines import LINES_PARAMS, lines_scale, make_reduce, needs_reduction, reduce_stats
from .registry import MergeMethod, Param, Preset, TensorContext, register
from .sparsify import (  # noqa: F401 - re-exported: the analysis and the tests import them from here
    della_keep_probabilities,
    global_cut,
    global_rank,
    magnitude_outliers_prune,
    magnitude_prune,
    random_prune,
    rescale_factors,
    rescale_l1,
    rescale_mode,
    sparsified_ranks,
    sparsifies,
    sparsify,
    sparsify_passes,
    top_k_mask,
    validate_della,
)

# --- the generalized merge -------------------------------------------------------------------------------------

def elect_sign_mask(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over stacked weighted task vectors (N, ...): the sign of their sum (0 counts as +);
    the mask keeps entries whose own sign agrees (zeros never do)."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


def divides(params: dict) -> bool:
    """Whether the merged sum is divided by the weights (``normalize``; TIES' ``merge: sum`` never divides)."""
    return bool(params["normalize"]) and params.get("merge", "mean") == "mean"


def merge_task_vectors(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext, *,
                       sparsification: str | None, consensus: bool) -> torch.Tensor:
    """θ_base + λ · Σ (m_i) w_i sparsify(τ_i) / divisor: see the module docstring for every term."""
    weights = model_weights(base, models, params, ctx)
    generator = ctx.generator(base.device) if sparsification == "della" else None
    deltas = torch.stack([sparsify(theta - base, sparsification, params, i, generator, ctx)
                          for i, theta in enumerate(models)])
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus:
        mask = elect_sign_mask(deltas).to(deltas.dtype)
        merged = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = deltas.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(merged).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if divides(params):
        merged /= divisor
    lam = params["lambda"] * lines_scale(params, ctx, len(models))
    if lam != 1:
        merged *= lam
    return base + merged


def merge_task_vectors_native(base, models, params, ctx, out_dtype, *, sparsification: str | None,
                              consensus: bool):
    """``merge_task_vectors`` as one fused pass over the stored inputs (merging/native); None where it needs the
    torch path (statistics that were not gathered)."""
    if not weights_known(params, ctx):
        return None
    sparsifying = sparsification is not None and sparsifies(params)
    scales = rescale_factors(params, ctx, sparsifying)
    if scales is None:
        return None
    cuts = draws = None
    if sparsifying and sparsification == "magnitude" and global_cut(params):
        found = (ctx.model_stats or {}).get("global")
        if found is None:
            return None
        cuts = [[(found[i], -1)] if params["density"][i] < 1 else [(-math.inf, -1)] for i in range(len(models))]
    elif sparsifying and sparsification in ("magnitude", "outliers"):
        found = (ctx.stats or {}).get("cuts")
        if found is None:
            return None
        cuts = [[cut.band_rule(ctx) for cut in model_cuts] if params["density"][i] < 1 else [(-math.inf, -1)]
                for i, model_cuts in enumerate(found)]
        if sparsification == "outliers":  # keep above the first cut, drop above the second
            cuts = [c if len(c) == 2 else [c[0], (math.inf, 0)] for c in cuts]
    elif sparsifying:  # random
        draws = ([rng.model_key(ctx, i) for i in range(len(models))],
                 [rng.keep_limit(min(1.0, d)) for d in params["density"]], rng.first_index(ctx))
    weights = model_weights(None, models, params, ctx)
    total = sum(weights)
    return ops.task_vectors(base, models, weights, scales, out_dtype, cuts=cuts, draws=draws, consensus=consensus,
                            normalize=divides(params), divisor=total if abs(total) >= 1e-8 else 1.0,
                            lam=params["lambda"] * lines_scale(params, ctx, len(models)))


# --- the registered methods ------------------------------------------------------------------------------------

WEIGHT = Param("weight", float, 1.0, "how much this model's task vector counts", per_model=True)
LAMBDA = Param("lambda", float, 1.0, "scales the merged task vector before it is added to the base")
INT8_MASK = Param("int8_mask", bool, False, "accepted for mergekit compatibility; no effect here")


def _density(help_text: str) -> Param:
    return Param("density", float, 1.0, help_text, per_model=True, min=0.0, max=1.0, min_exclusive=True)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the sum of the weights (of the agreeing models with a sign "
                 "election): a weighted mean rather than a sum")


def _rescale(default: bool, random: bool) -> Param:
    if not random:
        return Param("rescale", bool, default, "rescale each sparsified task vector to its original L1 norm")
    return Param("rescale", str, "l1" if default else "none",
                 "after the random drop: `l1` rescales each task vector to its original L1 norm (mergekit; `true`), "
                 "`inverse_keep` divides each survivor by its keep probability (the paper: unbiased), `none` "
                 "(`false`)", choices=("l1", "inverse_keep", "none"), aliases=((True, "l1"), (False, "none")))


TOPK_SCOPE = Param("topk_scope", str, "tensor", "TIES' top-k per `tensor` (mergekit) or one threshold over the whole "
                   "task vector, `model` (the official code: keep |τ| ≥ the k-th largest; one more pass)",
                   choices=("tensor", "model"))
MERGE = Param("merge", str, "mean", "the agreeing entries' disjoint `mean` (with normalize, mergekit) or disjoint "
              "`sum` (the official code's ViT protocol with λ = 0.3; the same as normalize: false)",
              choices=("mean", "sum"))
GAMMA = Param("gamma", float, 0.01, "fraction of the largest-magnitude entries dropped as outliers", per_model=True,
              min=0.0, max=1.0)
EPSILON = Param("epsilon", float, 0.15, "spread of keep probabilities: density ± epsilon from smallest to largest "
                "magnitude in each row", per_model=True, min=0.0, max=1.0)

TIES_PAPER = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv:2306.01708)"
DARE_PAPER = "Yu et al. 2024, Language models are Super Mario: DARE (arXiv:2311.03099)"
BREADCRUMBS_PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"
DELLA_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
DARE_PRESETS = (Preset("paper", "drop 90 %, survivors ÷ (1 − p) (Yu et al., Eq. 2): density 0.1",
                       {"density": 0.1, "rescale": "inverse_keep"}),
                Preset("several_models", "several models: drop 50 %, density 0.5", {"density": 0.5}))
BREADCRUMBS_PRESETS = (Preset("paper", "drop the top 1 %, keep 90 % (Davari & Belilovsky)",
                              {"density": 0.9, "gamma": 0.01}),)
DELLA_PRESETS = (Preset("paper", "density 0.7, ε 0.15, survivors ÷ own keep probability (Deep et al.)",
                        {"density": 0.7, "epsilon": 0.15, "rescale": "inverse_keep"}),)
TIES_PRESETS = (
    Preset("paper", "official code, ViT protocol: top 20 % of the whole task vector, disjoint sum, λ = 0.3 "
                    "(Yadav et al.; EMR's TIES script)",
           {"density": 0.2, "topk_scope": "model", "merge": "sum", "lambda": 0.3}),
    Preset("paper_mean", "paper's text: top 20 % of the whole task vector, disjoint mean, λ = 1 (Yadav et al.)",
           {"density": 0.2, "topk_scope": "model", "merge": "mean", "normalize": True, "lambda": 1.0}),
    Preset("mergekit", "mergekit's: top 20 % per tensor, disjoint mean, λ = 1",
           {"density": 0.2, "topk_scope": "tensor", "lambda": 1.0, "normalize": True}),
)


def _global_scope_needed(plan) -> bool:
    """``model_stats_needed`` of TIES: whether any tensor asks for ``topk_scope: model``; then every merged tensor
    must, with the same densities (one threshold over the whole task vector)."""
    merged = [t for t in plan.tasks if not t.copy]
    scoped = [t for t in merged if global_cut(t.params) and sparsifies(t.params)]
    if not scoped:
        return False
    first = scoped[0]
    for task in merged:
        if not global_cut(task.params) or list(task.params["density"]) != list(first.params["density"]):
            raise ConfigError(f"{task.name}: `topk_scope: model` takes one threshold over the whole task vector: "
                              "every tensor needs it, with the same density (no per-layer values or filters)")
    return True


def _register(name: str, summary: str, paper: str, sparsification: str | None, consensus: bool, extra: tuple,
              normalize: bool, rescale: bool, presets: tuple[Preset, ...] = ()) -> None:
    """Register one member of the family; its defaults for ``normalize`` and ``rescale`` are mergekit's."""
    random = sparsification in ("random", "della")
    params = (WEIGHT, *extra, LAMBDA, _normalize(normalize), _rescale(rescale, random), INT8_MASK,
              *COEFFICIENT_PARAMS, *LINES_PARAMS)
    fn = partial(merge_task_vectors, sparsification=sparsification, consensus=consensus)
    fn.__doc__ = f"{summary} ({paper}); see ``merge_task_vectors``."
    native = None  # DELLA's per-row magnitude ranks are a sort: only the torch path has them
    if sparsification != "della":
        native = partial(merge_task_vectors_native, sparsification=sparsification, consensus=consensus)
    ties = sparsification == "magnitude"
    register(MergeMethod(
        name=name, fn=fn, summary=summary, paper=paper, params=params, presets=presets, base="required",
        min_models=1, validate=validate_della if sparsification == "della" else None,
        trim_key="cuts" if ties else None, randomized=random,
        reduce=make_reduce(fn), reduce_needed=needs_reduction, reduce_stats=reduce_stats,
        elementwise=True, stats=(NAN_NORMS_PASS, *sparsify_passes(sparsification)), native=native,
        model_stats=global_topk_passes(global_rank, needed=lambda p: global_cut(p) and sparsifies(p)) if ties else (),
        model_stats_needed=_global_scope_needed if ties else None,
    ))


_register("ties", "trim each task vector to its largest entries, elect a sign per entry, average the agreeing ones",
          TIES_PAPER, "magnitude", True,
          (_density("fraction of each task vector kept, by magnitude (the paper uses 0.2; 1 keeps all)"), TOPK_SCOPE,
           MERGE), normalize=True, rescale=False, presets=TIES_PRESETS)
_register("dare_linear", "drop task-vector entries at random, rescale the survivors, add the weighted sum",
          DARE_PAPER, "random", False, (_density("keep probability of each entry (1 − the drop rate p)"),),
          normalize=False, rescale=True, presets=DARE_PRESETS)
_register("dare_ties", "DARE's random drop and rescale, then TIES' sign election and disjoint sum",
          DARE_PAPER, "random", True, (_density("keep probability of each entry (1 − the drop rate p)"),),
          normalize=False, rescale=True, presets=DARE_PRESETS)
_register("breadcrumbs", "drop the largest outliers and the smallest entries of each task vector, add the sum",
          BREADCRUMBS_PAPER, "outliers", False,
          (_density("fraction of each task vector kept after both cuts"), GAMMA), normalize=False, rescale=False,
          presets=BREADCRUMBS_PRESETS)
_register("breadcrumbs_ties", "Model Breadcrumbs' two-sided cut, then TIES' sign election",
          BREADCRUMBS_PAPER, "outliers", True,
          (_density("fraction of each task vector kept after both cuts"), GAMMA), normalize=False, rescale=False,
          presets=BREADCRUMBS_PRESETS)
_register("della", "drop entries at random with magnitude-ranked probabilities, rescale, elect signs (DELLA)",
          DELLA_PAPER, "della", True, (_density("mean keep probability of an entry"), EPSILON),
          normalize=True, rescale=True, presets=DELLA_PRESETS)
_register("della_linear", "DELLA's magnitude-ranked random drop and rescale, then a weighted sum (no election)",
          DELLA_PAPER, "della", False, (_density("mean keep probability of an entry"), EPSILON),
          normalize=False, rescale=True, presets=DELLA_PRESETS)
