"""How the task-vector family sparsifies one task vector: TIES' top-k, Model Breadcrumbs' two-sided cut, DARE's and
DELLA's random drops, and the rescale that follows them.

The magnitude cuts are per tensor (mergekit's choice: exact top-k with ties broken by flat position, from the
statistics passes of ``methods.selection`` when the tensor runs band by band) or, for TIES with ``topk_scope:
model``, one threshold over the whole task vector (``methods.global_topk``: keep |τ| ≥ the k-th largest, as the
official TIES code). The rescale after a random drop is one of:

- ``l1`` (mergekit's, the default): kept · ‖τ‖₁ / ‖kept‖₁ over the whole tensor (an L1 statistics pass when the
  tensor runs band by band);
- ``inverse_keep`` (the papers'): DARE divides each survivor by the keep probability 1 − p (Yu et al. 2024, Eq. 2:
  τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p)); DELLA divides each survivor by its own keep probability p_i (Deep et
  al. 2024, Eq. 3; the official code). Both make E[τ̃] = τ element by element, which the L1 form does not for small
  tensors: a 1-element tensor keeps τ with probability 1 − p and its L1 rescale is then 1, so E[τ̃] = (1 − p)·τ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..native import ops, rng
from .coefficients import ordered_sum
from .registry import StatsPass, TensorContext
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
                where: str = "della", inverse_keep: bool = False) -> torch.Tensor:
    """DELLA: keep each entry with its magnitude-ranked probability (see ``della_keep_probabilities``); with
    ``inverse_keep`` each survivor is divided by its own keep probability (DELLA's rescale)."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    check_della_bounds(density, epsilon, where)
    probabilities = della_keep_probabilities(tau, density, epsilon)
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=torch.float32) < probabilities
    return tau * keep / probabilities if inverse_keep else tau * keep


def rescale_mode(params: dict) -> str:
    """``none``, ``l1`` or ``inverse_keep`` from the ``rescale`` setting (true is mergekit's L1 rescale)."""
    value = params.get("rescale", False)
    if value is True:
        return "l1"
    if value is False or value is None:
        return "none"
    return value


def global_cut(params: dict) -> bool:
    """Whether TIES' top-k is one threshold over the whole task vector (``topk_scope: model``)."""
    return params.get("topk_scope", "tensor") == "model"


def sparsify(tau: torch.Tensor, how: str | None, params: dict, i: int, generator: torch.Generator | None,
             ctx: TensorContext, rescale: bool = True) -> torch.Tensor:
    """Apply sparsification ``how`` to model ``i``'s task vector with its own density (and gamma/epsilon).

    On a band of a tensor (``ctx.band``) the whole-tensor quantities come from the stats passes in ``ctx.stats``:
    the exact top-k cuts and the L1 norms for the rescale; TIES' whole-model threshold from ``ctx.model_stats``.
    """
    if how is None:
        return tau
    density = params["density"][i]
    mode = rescale_mode(params) if rescale else "none"
    cuts = (ctx.stats or {}).get("cuts")
    if how == "magnitude" and density < 1 and global_cut(params):
        kept = tau * (tau.abs() >= model_threshold(ctx, i))
    elif how == "magnitude":
        kept = tau * cuts[i][0].keep(tau.abs(), ctx) if cuts and density < 1 else magnitude_prune(tau, density)
    elif how == "outliers":
        if cuts and density < 1:
            magnitude = tau.abs()
            kept = tau * (cuts[i][0].keep(magnitude, ctx) & ~cuts[i][1].keep(magnitude, ctx))
        else:
            kept = magnitude_outliers_prune(tau, density, params["gamma"][i])
    elif how == "random":
        kept = random_prune(tau, density, ctx, i)
        if mode == "inverse_keep" and density < 1:
            kept = kept / density
    elif how == "della":
        kept = della_prune(tau, density, params["epsilon"][i], generator, ctx.name, mode == "inverse_keep")
    else:
        raise ValueError(how)
    if mode == "l1" and density < 1:
        l1 = (ctx.stats or {}).get("l1")
        if l1 is None:
            kept = rescale_l1(tau, kept)
        elif l1[0][i] >= 1e-7 and l1[1][i] >= 1e-7:
            kept = kept * float(l1[0][i] / l1[1][i])
    return kept


def model_threshold(ctx: TensorContext, i: int) -> float:
    """Model ``i``'s whole-model magnitude threshold (``topk_scope: model``), from the whole-model passes."""
    found = (ctx.model_stats or {}).get("global")
    if found is None:
        raise ConfigError(f"{ctx.name}: `topk_scope: model` needs the whole-model threshold pass (merge through the "
                          "engine: `python -m merging merge`)")
    return found[i]


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


def global_rank(params: dict, i: int, n: int) -> int:
    """The official TIES code's rank over the whole task vector: it keeps |τ| ≥ the (n − ⌊density·n⌋)-th smallest
    value, i.e. the (⌊density·n⌋ + 1)-th largest (``kthvalue`` then ``>=``); density 1 keeps everything."""
    density = params["density"][i]
    return n if density >= 1 else int(density * n) + 1


def sparsifies(params: dict) -> bool:
    return any(d < 1 for d in params["density"])


def _per_tensor_cut(params: dict) -> bool:
    return sparsifies(params) and not global_cut(params)


def _l1_pass(how: str) -> StatsPass:
    """The L1 norms before and after sparsification, summed over bands, for the ``l1`` rescale (same random draws
    as the merge itself: DARE's draws hash the element position, DELLA's generator is seeded by the band)."""
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
                     needed=lambda params: rescale_mode(params) == "l1" and sparsifies(params),
                     native=collect_native)


def sparsify_passes(how: str | None) -> tuple[StatsPass, ...]:
    """The per-tensor statistics a sparsification needs before a tensor is merged band by band."""
    passes: tuple[StatsPass, ...] = ()
    if how in ("magnitude", "outliers"):
        passes += topk_passes(sparsified_ranks(how), needed=_per_tensor_cut)
    if how is not None:
        passes += (_l1_pass(how),)
    return passes


def rescale_factors(params: dict, ctx: TensorContext, sparsifying: bool) -> list[float] | None:
    """Each model's rescale factor from the L1 pass (‖τ_i‖₁ / ‖sparsified τ_i‖₁) or 1/density for DARE's
    ``inverse_keep`` (1 where not rescaled); None when the L1 pass has not run (the torch path then computes it)."""
    n = len(params["density"])
    mode = rescale_mode(params)
    if not sparsifying or mode == "none":
        return [1.0] * n
    if mode == "inverse_keep":
        return [1.0 / d if d < 1 else 1.0 for d in params["density"]]
    l1 = (ctx.stats or {}).get("l1")
    if l1 is None:
        return None
    return [float(l1[0][i] / l1[1][i]) if params["density"][i] < 1 and l1[0][i] >= 1e-7 and l1[1][i] >= 1e-7 else 1.0
            for i in range(n)]


def rescale_alias(value: Any) -> Any:
    """The ``rescale`` value as the random methods hold it: true/false (mergekit) as ``l1``/``none``."""
    if value is True:
        return "l1"
    if value is False:
        return "none"
    return value
