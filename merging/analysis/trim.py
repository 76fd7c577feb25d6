"""The trim behind the trimmed sign disagreement: TIES' top-``density`` fraction of each task vector by |τ|.

The cuts are the methods' own exact top-k (``methods.selection``: ties broken by flat position), gathered over a
tensor's bands by the engine's statistics passes, or taken from the method when it declares them (``trim_key``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..engine import Executor
from ..methods.registry import MergeMethod, TensorContext
from ..methods.selection import Cut, topk_passes
from ..methods.task_vectors import sparsified_ranks
from ..plan import TensorTask
from ..whole_model import gather_stats

DEFAULT_TRIM_DENSITY = 0.2  # TIES' k = 20%, for methods that have no `density` parameter
KEEP_ALL = (-math.inf, -1)  # the fused kernel's rule for an untrimmed task vector

# The trim's exact top-k cuts, per model, gathered over a tensor's bands like a sparsifying method's.
TRIM_PASSES = topk_passes(sparsified_ranks("magnitude"), key="trim", needed=lambda p: any(d < 1 for d in p["density"]))


def trims_by_config(method: MergeMethod) -> bool:
    """Whether the trim takes the config's ``density`` (a method with that parameter), else the default."""
    return any(p.name == "density" for p in method.params)


def trim_densities(method: MergeMethod, params: dict, n_models: int) -> list[float]:
    return list(params["density"]) if trims_by_config(method) else [DEFAULT_TRIM_DENSITY] * n_models


@dataclass
class Trim:
    """The trim of the rows in hand: each model's cut of its whole tensor (None keeps everything), and the context
    that places these rows in it (which of the tied elements a band keeps depends on where it starts)."""

    cuts: list[Cut | None]
    ctx: TensorContext

    def rules(self) -> list[tuple[float, int]]:
        """Per model (threshold, ties) for the fused kernel, as ``Cut.band_rule``."""
        return [KEEP_ALL if cut is None else cut.band_rule(self.ctx) for cut in self.cuts]

    def keep(self, model: int, magnitude: torch.Tensor) -> torch.Tensor:
        """The boolean mask of what model ``model``'s trim keeps of these rows (``magnitude``: its |τ| on them)."""
        cut = self.cuts[model]
        if cut is None:
            return torch.ones_like(magnitude, dtype=torch.bool)
        return cut.keep(magnitude, self.ctx)


def first_cuts(found: list[list[Cut]] | None, n_models: int) -> list[Cut | None]:
    """The one cut per model of a magnitude top-k (``topk_passes`` gives a list of cuts per model)."""
    return [None] * n_models if found is None else [model_cuts[0] for model_cuts in found]


def tensor_cuts(executor: Executor, task: TensorTask, reduced, densities: list[float], stats,
                first) -> list[Cut | None]:
    """One tensor's trim cuts: the method's own (``trim_key``: the same ranks, no extra read) when it declares them,
    else from the trim passes over its bands (``first``: the band in hand, not read again)."""
    if not any(d < 1 for d in densities):
        return [None] * len(densities)
    key = executor.plan.method.trim_key
    if key is not None and stats and key in stats:
        return first_cuts(stats[key], len(densities))
    found = executor.tensor_stats(task, reduced, passes=TRIM_PASSES, params={"density": densities}, first=first)
    return first_cuts(found["trim"], len(densities))


def _strided(base: torch.Tensor, models: list[torch.Tensor], stride: int):
    if stride == 1:
        return base, models
    return base.reshape(-1)[::stride], [m.reshape(-1)[::stride] for m in models]


def whole_tensor_trim(base: torch.Tensor, models: list[torch.Tensor], densities: list[float]) -> Trim:
    """The trim of float32 tensors in hand, taken as whole tensors: the trim passes run on them directly."""
    ctx = TensorContext("trim", shape=tuple(base.shape))
    stats = gather_stats(TRIM_PASSES, {"density": list(densities)}, lambda: iter([(None, (base, models))]),
                         lambda band, stats: dataclasses.replace(ctx, stats=stats), _strided)
    return Trim(first_cuts(stats["trim"] if stats else None, len(models)), ctx)
