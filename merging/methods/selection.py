"""Exact top-k by magnitude over a whole tensor, found band by band (Floyd–Rivest style selection).

Sparsifying methods keep the k largest |τ| of each task vector. Sorting 65M elements per model is the slowest
part of a TIES merge, and holding them is the largest part of its memory, so instead:

1. a strided sample of |τ| brackets the k-th largest value between two sample order statistics;
2. one pass counts the elements above the bracket and collects the few inside it; the exact k-th largest is
   selected among those candidates;
3. elements equal to the threshold are kept in flat index order until exactly k are kept, so the count is
   exact and the result deterministic.

If a bracket misses (the sample was unlucky; the margin makes this rare), a last pass collects that model's
whole tensor and selects directly, so the answer is always exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..native import ops
from .registry import StatsPass, TensorContext

SAMPLE_STRIDE = 61  # prime, so a stride never lines up with a row length
MAX_MODELS = 64
MAX_RANKS = 4


def _magnitudes(base: torch.Tensor | None, models: list[torch.Tensor], relative: bool) -> list[torch.Tensor]:
    if relative:
        return [(m - base).abs_().reshape(-1) for m in models]
    return [m.abs().reshape(-1) for m in models]


def _band_start(ctx: TensorContext) -> int:
    return ctx.band[0] if ctx.band else 0


def topk_passes(ranks: Callable[[dict, int, int], list[int]], relative: bool = True, key: str = "cuts",
                needed: Callable[[dict], bool] | None = None) -> tuple[StatsPass, ...]:
    """Stats passes giving, per model i, exact thresholds for the ranks ``ranks(params, i, numel)``.

    ``ctx.stats[key]`` after them is a list per model of ``Cut`` objects (one per requested rank, in order);
    other keys of ``ctx.stats`` pass through. ``relative`` selects on |θ_i − θ_base| (task vectors) instead of
    |θ_i|. ``needed(params)`` lets a tensor skip the passes (and their reads) when nothing is sparsified.
    """

    def sample(base, models, params, ctx):
        # The engine hands this pass every SAMPLE_STRIDE-th element only (``sample_stride``), before conversion.
        return {f"s{i}": a for i, a in enumerate(_magnitudes(base, models, relative))}

    def sample_native(base, models, params, ctx):  # the same sample, from the whole band as stored
        return {f"s{i}": ops.strided_magnitudes(base if relative else None, model, SAMPLE_STRIDE)
                for i, model in enumerate(models)}

    def brackets(combined, params, ctx):
        numel = math.prod(ctx.shape)
        out: list = []
        for i in range(len([k for k in combined if k.startswith("s")])):
            s = combined[f"s{i}"]
            m = s.numel()
            wanted = []  # (k, the sample ranks bracketing it: hi's and lo's)
            for k in ranks(params, i, numel):
                r = k * m / numel
                margin = 4.0 * math.sqrt(max(r * (1 - r / m), 1.0)) + 8
                wanted.append((k, int(r - margin), int(math.ceil(r + margin))))
            value = largest(s, [rank for _, hi_rank, lo_rank in wanted for rank in (hi_rank, lo_rank)
                                if 0 <= rank < m])
            out.append([(k, -1.0 if lo_rank >= m else value[lo_rank], float("inf") if hi_rank < 0 else value[hi_rank])
                        for k, hi_rank, lo_rank in wanted])
        return {**(ctx.stats or {}), key: out}

    def count(base, models, params, ctx):
        mags = _magnitudes(base, models, relative)
        part = {}
        start = torch.tensor([_band_start(ctx)], dtype=torch.int64)
        part["start"] = start
        for i, a in enumerate(mags):
            for j, (_, lo, hi) in enumerate(ctx.stats[key][i]):
                part[f"gt{i}_{j}"] = (a > hi).sum(dtype=torch.int64)
                inside = a[(a >= lo) & (a <= hi)]
                part[f"c{i}_{j}"] = inside
                part[f"n{i}_{j}"] = torch.tensor([inside.numel()], dtype=torch.int64)
        return part

    def count_native(base, models, params, ctx):
        part = {"start": torch.tensor([_band_start(ctx)], dtype=torch.int64)}
        for i, model in enumerate(models):
            for j, (_, lo, hi) in enumerate(ctx.stats[key][i]):
                above, inside = ops.bracket(base if relative else None, model, lo, hi)
                part[f"gt{i}_{j}"] = torch.tensor(above, dtype=torch.int64)
                part[f"c{i}_{j}"] = inside
                part[f"n{i}_{j}"] = torch.tensor([inside.numel()], dtype=torch.int64)
        return part

    def select(combined, params, ctx):
        result = []
        numel = math.prod(ctx.shape)
        starts = combined["start"].tolist()
        for i, cuts in enumerate(ctx.stats[key]):
            model_cuts = []
            for j, (k, _lo, _hi) in enumerate(cuts):
                cand = combined[f"c{i}_{j}"]
                above = int(combined[f"gt{i}_{j}"])
                need = k - above  # how many of the candidates are kept
                if k <= 0:
                    model_cuts.append(Cut(k, float("inf"), 0, {}))
                elif k >= numel:
                    model_cuts.append(Cut(k, -1.0, -1, {}))  # keep everything
                elif 1 <= need <= cand.numel():
                    thr = float(torch.kthvalue(cand, cand.numel() - need + 1).values)
                    kept_above = above + int((cand > thr).sum())
                    model_cuts.append(_cut(k, thr, kept_above, cand, combined[f"n{i}_{j}"], starts))
                else:
                    model_cuts.append(Cut(k, math.nan, 0, {}))  # bracket missed: resolved by the fallback pass
            result.append(model_cuts)
        return {**ctx.stats, key: result}

    def fallback_collect(base, models, params, ctx):
        missing = [i for i, cuts in enumerate(ctx.stats[key]) if any(math.isnan(c.threshold) for c in cuts)]
        if not missing:
            return {}
        mags = _magnitudes(base, models, relative)
        part = {"start": torch.tensor([_band_start(ctx)], dtype=torch.int64)}
        for i in missing:
            part[f"a{i}"] = mags[i].clone()
            part[f"n{i}"] = torch.tensor([mags[i].numel()], dtype=torch.int64)
        return part

    def fallback_finish(combined, params, ctx):
        if not combined:
            return ctx.stats
        starts = combined["start"].tolist()
        fixed = []
        for i, cuts in enumerate(ctx.stats[key]):
            if f"a{i}" not in combined:
                fixed.append(cuts)
                continue
            a = combined[f"a{i}"]
            model_cuts = []
            for cut in cuts:
                if not math.isnan(cut.threshold):
                    model_cuts.append(cut)
                    continue
                thr = float(torch.kthvalue(a, a.numel() - cut.k + 1).values)
                model_cuts.append(_cut(cut.k, thr, int((a > thr).sum()), a, combined[f"n{i}"], starts))
            fixed.append(model_cuts)
        return {**ctx.stats, key: fixed}

    def fallback_needed(params) -> bool:
        return needed is None or needed(params)

    return (
        StatsPass(sample, brackets, concat=tuple(f"s{i}" for i in range(MAX_MODELS)), needed=needed,
                  sample_stride=SAMPLE_STRIDE, native=sample_native),
        StatsPass(count, select, concat=("start",) + tuple(f"{p}{i}_{j}" for p in "cn" for i in range(MAX_MODELS)
                                                          for j in range(MAX_RANKS)), needed=needed,
                  native=count_native),
        StatsPass(fallback_collect, fallback_finish, needed=fallback_needed, only_if=_bracket_missed(key),
                  concat=("start",) + tuple(f"{p}{i}" for p in "an" for i in range(MAX_MODELS))),
    )


def largest(values: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """The (rank + 1)-th largest of ``values`` for each rank, by selection rather than a sort: on the CPU one
    multi-selection for all of them (numpy's introselect: a third of the time of one torch.kthvalue per rank)."""
    n = values.numel()
    if values.device.type != "cpu":
        return {rank: float(torch.kthvalue(values, n - rank).values) for rank in ranks}
    ascending = values.numpy()
    chosen = np.partition(ascending, sorted({n - 1 - rank for rank in ranks})) if ranks else ascending
    return {rank: float(chosen[n - 1 - rank]) for rank in ranks}


def _bracket_missed(key: str) -> Callable[[object], bool]:
    def missed(stats) -> bool:
        return bool(stats) and key in stats and any(math.isnan(c.threshold) for cuts in stats[key] for c in cuts)
    return missed


class Cut:
    """The exact k-th largest magnitude and how ties at it are broken (first ``ties_kept`` in flat order)."""

    __slots__ = ("k", "threshold", "ties_kept", "ties_before")

    def __init__(self, k: int, threshold: float, ties_kept: int, ties_before: dict[int, tuple[int, int]]) -> None:
        self.k = k
        self.threshold = threshold
        self.ties_kept = ties_kept  # how many elements equal to the threshold are kept; -1: all of them
        # band start row -> (ties in earlier bands, ties in this band): only the band where the kept count runs out
        # needs a running count
        self.ties_before = ties_before

    def band_rule(self, ctx: TensorContext) -> tuple[float, int]:
        """What this band keeps, as (threshold, ties): every magnitude above the threshold, and of the elements
        equal to it all (ties = -1), none (0) or the first ``ties`` in flat order from the band's start."""
        if self.k <= 0:
            return math.inf, 0
        if self.ties_kept <= 0:
            return self.threshold, self.ties_kept
        before, here = self.ties_before.get(_band_start(ctx), (0, None))
        if before >= self.ties_kept:
            return self.threshold, 0  # the kept ties all lie in earlier bands
        if here is not None and before + here <= self.ties_kept:
            return self.threshold, -1  # every tie in this band is kept
        return self.threshold, self.ties_kept - before

    def keep(self, magnitude: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """The boolean mask of kept elements for this band (same shape as ``magnitude``)."""
        threshold, ties = self.band_rule(ctx)
        if ties < 0:
            return magnitude >= threshold
        mask = magnitude > threshold
        if ties == 0:
            return mask
        equal = (magnitude == threshold).reshape(-1)
        order = torch.cumsum(equal, 0, dtype=torch.int64)
        return mask | (equal & (order <= ties)).reshape(magnitude.shape)


def _cut(k: int, thr: float, above: int, values: torch.Tensor, lengths: torch.Tensor, starts: list[int]) -> Cut:
    equal_total = int((values == thr).sum())
    kept = k - above
    if kept >= equal_total:
        return Cut(k, thr, -1, {})
    # Ties are cut: how many equal elements lie in bands before each band, from the per-band value counts.
    before, running, offset = {}, 0, 0
    for start, n in zip(starts, lengths.tolist()):
        here = int((values[offset:offset + n] == thr).sum())
        before[start] = (running, here)
        running += here
        offset += n
    return Cut(k, thr, kept, before)
