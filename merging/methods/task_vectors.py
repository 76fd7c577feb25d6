"""The task-vector family: sparsify each task vector, optionally elect a sign, then a weighted (disjoint) sum.

One generalized function covers every method here (mergekit's "generalized task arithmetic"); the methods differ
only in how each τ_i is sparsified, whether a sign is elected and their defaults:

    τ_i = θ_i − θ_base
    δ_i = w_i · sparsify(τ_i)
    without consensus:  Δ = Σ_i δ_i,                      divisor = Σ_i w_i
    with consensus:     s = sign(Σ_i δ_i) (0 counts as +),  m_i = [sign(δ_i) = s]
                        Δ = Σ_i m_i δ_i,                   divisor = Σ_i m_i w_i   (the disjoint mean)
    θ = θ_base + λ · Δ / divisor   (the division only when ``normalize``; a zero divisor counts as 1)

``rescale`` multiplies each sparsified τ_i so that its L1 norm equals the original's (mergekit's rescale; DARE's
paper divides by the keep probability instead: both keep the expected magnitude, the L1 form exactly per tensor).
DARE's random masks hash (seed, tensor name, model, element position) (``merging/native/rng.py``), DELLA's draw from
``ctx.generator()`` seeded by (seed, tensor name, band): the same config gives the same bytes in any order and on
any number of threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from ..errors import ConfigError
from ..native import ops, rng
from .coefficients import (
    COEFFICIENT_PARAMS,
    NAN_NORMS_PASS,
    model_weights,
    nan_reduce,
    needs_model_norms,
    ordered_sum,
    weights_known,
)
from .registry import MergeMethod, Param, Preset, StatsPass, TensorContext, register
from .selection import topk_passes

# --- sparsification: each takes one task vector and returns it with some entries set to zero -----------------

def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of exactly the ``k`` largest entries, found by selection (kthvalue), not a full sort.

    Ties at the threshold are broken by flat position (first ones kept), so the mask is deterministic and the
    top-k mask is always contained in the top-(k+j) mask.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = flat.kthvalue(n - k + 1).values  # the k-th largest value
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = (flat == threshold).nonzero().reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(magnitude.shape)


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` times ‖original‖₁ / ‖kept‖₁, so the sparsified vector has the original's L1 norm (sums in a fixed
    order: the same bytes on any number of threads)."""
    before = ordered_sum(original.abs())
    after = ordered_sum(kept.abs())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude_prune(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``density`` fraction of entries largest in |τ| (at least one), zero the rest."""
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    k = max(1, int(density * tau.numel()))
    return tau * top_k_mask(tau.abs(), k)


def magnitude_outliers_prune(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction by |τ| (outliers), then the smallest, so that
    ``density`` of the entries stay. In ascending order of |τ| the kept ranks are [n_bot, n_bot + n_keep) with
    n_keep = ⌊density·n⌋ and n_bot = max(0, n − n_keep − ⌊gamma·n⌋): when gamma + density > 1 fewer outliers go."""
    if density >= 1:
        return tau
    n = tau.numel()
    keep = int(density * n)
    n_bottom = max(0, n - keep - int(gamma * n))
    magnitude = tau.abs()
    below_top = top_k_mask(magnitude, n - n_bottom)  # everything except the smallest n_bottom
    outliers = top_k_mask(magnitude, n - n_bottom - keep)  # the largest ones beyond the kept band
    return tau * (below_top & ~outliers)


def random_prune(tau: torch.Tensor, density: float, ctx: TensorContext, model: int) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (drop rate p = 1 − density); the draws
    are a hash of (seed, tensor, model, element position), so any band layout gives the same mask."""
    if density >= 1:
        return tau
    return tau * rng.keep_mask(ctx, model, tau.shape, density, tau.device)


def della_keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: within each row, p_keep = density − ε + 2ε · r, r the entry's |τ| rank scaled to [0, 1]
    (smallest 0, largest 1); a 1-D tensor is one row."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    width = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(width, dtype=rows.dtype, device=rows.device).expand_as(rows).contiguous())
    scaled = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * scaled).reshape(tau.shape)


def check_della_bounds(density: float, epsilon: float, where: str) -> None:
    """DELLA's keep probabilities density ± ε must lie in (0, 1) (a density of 1 keeps everything)."""
    if density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
        raise ConfigError(f"{where}: della needs 0 < density ± epsilon < 1, got density {density:g}, "
                          f"epsilon {epsilon:g}")


def validate_della(params: dict, where: str) -> None:
    """``validate`` of the DELLA methods: each model's density ± epsilon in (0, 1)."""
    for i, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
        check_della_bounds(density, epsilon, f"{where} (model {i + 1})" if len(params["density"]) > 1 else where)


def della_prune(tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                where: str = "della") -> torch.Tensor:
    """DELLA: keep each entry with its magnitude-ranked probability (see ``della_keep_probabilities``)."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    check_della_bounds(density, epsilon, where)
    probabilities = della_keep_probabilities(tau, density, epsilon)
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=torch.float32) < probabilities
    return tau * keep


def sparsify(tau: torch.Tensor, how: str | None, params: dict, i: int, generator: torch.Generator | None,
             ctx: TensorContext, rescale: bool = True) -> torch.Tensor:
    """Apply sparsification ``how`` to model ``i``'s task vector with its own density (and gamma/epsilon).

    On a band of a tensor (``ctx.band``) the whole-tensor quantities come from the stats passes in ``ctx.stats``:
    the exact top-k cuts and the L1 norms for the rescale.
    """
    if how is None:
        return tau
    density = params["density"][i]
    cuts = (ctx.stats or {}).get("cuts")
    if how == "magnitude":
        kept = tau * cuts[i][0].keep(tau.abs(), ctx) if cuts and density < 1 else magnitude_prune(tau, density)
    elif how == "outliers":
        if cuts and density < 1:
            magnitude = tau.abs()
            kept = tau * (cuts[i][0].keep(magnitude, ctx) & ~cuts[i][1].keep(magnitude, ctx))
        else:
            kept = magnitude_outliers_prune(tau, density, params["gamma"][i])
    elif how == "random":
        kept = random_prune(tau, density, ctx, i)
    elif how == "della":
        kept = della_prune(tau, density, params["epsilon"][i], generator, ctx.name)
    else:
        raise ValueError(how)
    if rescale and params.get("rescale") and density < 1:
        l1 = (ctx.stats or {}).get("l1")
        if l1 is None:
            kept = rescale_l1(tau, kept)
        elif l1[0][i] >= 1e-7 and l1[1][i] >= 1e-7:
            kept = kept * float(l1[0][i] / l1[1][i])
    return kept


def sparsified_ranks(how: str) -> Callable[[dict, int, int], list[int]]:
    """The ranks whose exact magnitude thresholds ``sparsify`` needs, per model: top-k for TIES; for Breadcrumbs
    everything but the smallest n_bottom, and the outliers above the kept band."""
    def ranks(params: dict, i: int, n: int) -> list[int]:
        density = params["density"][i]
        if how == "magnitude":
            return [n if density >= 1 else (0 if density <= 0 else max(1, int(density * n)))]
        keep = int(density * n)
        n_bottom = max(0, n - keep - int(params["gamma"][i] * n))
        return [n - n_bottom, n - n_bottom - keep]
    return ranks


def _sparsifies(params: dict) -> bool:
    return any(d < 1 for d in params["density"])


def _l1_pass(how: str) -> StatsPass:
    """The L1 norms before and after sparsification, summed over bands, for ``rescale`` (same random draws as the
    merge itself: DARE's draws hash the element position, DELLA's generator is seeded by the band)."""
    def collect(base, models, params, ctx):
        generator = ctx.generator(base.device) if how == "della" else None
        before, after = [], []
        for i, theta in enumerate(models):
            tau = theta - base
            kept = sparsify(tau, how, params, i, generator, ctx, rescale=False)
            before.append(ordered_sum(tau.abs()).to(torch.float64))
            after.append(ordered_sum(kept.abs()).to(torch.float64))
        return {"l1": torch.stack([torch.stack(before), torch.stack(after)])}

    def collect_native(base, models, params, ctx):
        if how != "random":
            return None
        start = rng.first_index(ctx)
        sums = [ops.random_l1(base, theta, rng.model_key(ctx, i), rng.keep_limit(min(1.0, params["density"][i])),
                              start) for i, theta in enumerate(models)]
        return {"l1": torch.tensor([[s[0] for s in sums], [s[1] for s in sums]], dtype=torch.float64)}

    return StatsPass(collect, finish=lambda combined, params, ctx: {**(ctx.stats or {}), **combined},
                     needed=lambda params: bool(params.get("rescale")) and _sparsifies(params),
                     native=collect_native)


def stats_passes(how: str | None) -> tuple[StatsPass, ...]:
    """What a family member needs before merging a tensor band by band."""
    passes: tuple[StatsPass, ...] = (NAN_NORMS_PASS,)
    if how in ("magnitude", "outliers"):
        passes += topk_passes(sparsified_ranks(how), needed=_sparsifies)
    if how is not None:
        passes += (_l1_pass(how),)
    return passes


# --- the generalized merge -------------------------------------------------------------------------------------

def elect_sign_mask(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over stacked weighted task vectors (N, ...): the sign of their sum (0 counts as +);
    the mask keeps entries whose own sign agrees (zeros never do)."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


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
    if params["normalize"]:
        merged /= divisor
    if params["lambda"] != 1:
        merged *= params["lambda"]
    return base + merged


def _rescale_factors(params: dict, ctx: TensorContext, sparsifying: bool) -> list[float] | None:
    """Each model's rescale factor ‖τ_i‖₁ / ‖sparsified τ_i‖₁ from the L1 pass (1 where not rescaled); None when the
    pass has not run (the torch path then computes it from the tensor)."""
    n = len(params["density"])
    if not (sparsifying and params.get("rescale")):
        return [1.0] * n
    l1 = (ctx.stats or {}).get("l1")
    if l1 is None:
        return None
    return [float(l1[0][i] / l1[1][i]) if params["density"][i] < 1 and l1[0][i] >= 1e-7 and l1[1][i] >= 1e-7 else 1.0
            for i in range(n)]


def merge_task_vectors_native(base, models, params, ctx, out_dtype, *, sparsification: str | None,
                              consensus: bool):
    """``merge_task_vectors`` as one fused pass over the stored inputs (merging/native); None where it needs the
    torch path (statistics that were not gathered)."""
    if not weights_known(params, ctx):
        return None
    sparsifying = sparsification is not None and _sparsifies(params)
    scales = _rescale_factors(params, ctx, sparsifying)
    if scales is None:
        return None
    cuts = draws = None
    if sparsifying and sparsification in ("magnitude", "outliers"):
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
                            normalize=params["normalize"], divisor=total if abs(total) >= 1e-8 else 1.0,
                            lam=params["lambda"])


# --- the registered methods ------------------------------------------------------------------------------------

WEIGHT = Param("weight", float, 1.0, "how much this model's task vector counts", per_model=True)
LAMBDA = Param("lambda", float, 1.0, "scales the merged task vector before it is added to the base")
INT8_MASK = Param("int8_mask", bool, False, "accepted for mergekit compatibility; no effect here")


def _density(help_text: str) -> Param:
    return Param("density", float, 1.0, help_text, per_model=True, min=0.0, max=1.0, min_exclusive=True)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the sum of the weights (of the agreeing models with a sign "
                 "election): a weighted mean rather than a sum")


def _rescale(default: bool) -> Param:
    return Param("rescale", bool, default, "rescale each sparsified task vector to its original L1 norm")


GAMMA = Param("gamma", float, 0.01, "fraction of the largest-magnitude entries dropped as outliers", per_model=True,
              min=0.0, max=1.0)
EPSILON = Param("epsilon", float, 0.15, "spread of keep probabilities: density ± epsilon from smallest to largest "
                "magnitude in each row", per_model=True, min=0.0, max=1.0)

TIES_PAPER = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"
DARE_PAPER = "Yu et al. 2024, Language models are Super Mario: DARE (arXiv:2311.03099)"
BREADCRUMBS_PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"
DELLA_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
DARE_PRESETS = (Preset("paper", "drop 90 %: density 0.1 (Yu et al.)", {"density": 0.1}),
                Preset("several_models", "several models: drop 50 %, density 0.5", {"density": 0.5}))
BREADCRUMBS_PRESETS = (Preset("paper", "drop the top 1 %, keep 90 % (Davari & Belilovsky)",
                              {"density": 0.9, "gamma": 0.01}),)
DELLA_PRESETS = (Preset("paper", "density 0.7, ε 0.15 (Deep et al.)", {"density": 0.7, "epsilon": 0.15}),)


def _register(name: str, summary: str, paper: str, sparsification: str | None, consensus: bool, extra: tuple,
              normalize: bool, rescale: bool, presets: tuple[Preset, ...] = ()) -> None:
    """Register one member of the family; its defaults for ``normalize`` and ``rescale`` are mergekit's."""
    params = (WEIGHT, *extra, LAMBDA, _normalize(normalize), _rescale(rescale), INT8_MASK, *COEFFICIENT_PARAMS)
    fn = partial(merge_task_vectors, sparsification=sparsification, consensus=consensus)
    fn.__doc__ = f"{summary} ({paper}); see ``merge_task_vectors``."
    native = None  # DELLA's per-row magnitude ranks are a sort: only the torch path has them
    if sparsification != "della":
        native = partial(merge_task_vectors_native, sparsification=sparsification, consensus=consensus)
    register(MergeMethod(
        name=name, fn=fn, summary=summary, paper=paper, params=params, presets=presets, base="required",
        min_models=1, validate=validate_della if sparsification == "della" else None,
        trim_key="cuts" if sparsification == "magnitude" else None,
        randomized=sparsification in ("random", "della"), reduce=nan_reduce, reduce_needed=needs_model_norms,
        elementwise=True, stats=stats_passes(sparsification), native=native,
    ))


_register("ties", "trim each task vector to its largest entries, elect a sign per entry, average the agreeing ones",
          TIES_PAPER, "magnitude", True,
          (_density("fraction of each task vector kept, by magnitude (the paper uses 0.2; 1 keeps all)"),),
          normalize=True, rescale=False,
          presets=(Preset("paper", "top 20 %, λ = 1 (Yadav et al.)",
                          {"density": 0.2, "lambda": 1.0, "normalize": True}),))
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
