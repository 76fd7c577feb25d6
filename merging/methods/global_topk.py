"""An exact magnitude threshold over the whole task vector, found in streaming passes with bounded memory.

For model i, with |τ_i| taken over every merged element of the model (D elements), the threshold v_i is the r_i-th
largest value (``ranks(params, i, D)``, 1-based); a method then keeps |τ_i| ≥ v_i, so ties at v_i are all kept, as
the official TIES code does (``kthvalue`` on the flattened task vector, then ``>=``). The passes, run by
``merging.whole_model`` over every band of every merged tensor:

1. a strided sample of |τ_i| (at most ``MODEL_SAMPLE_ELEMENTS`` per model) brackets v_i between two sample order
   statistics, with a margin of 4 standard deviations of the sample rank plus 8;
2. a counting pass counts the elements above the bracket and collects those inside it; v_i is selected among them;
3. if a bracket missed (the sample was unlucky: rare), one more pass collects every element on the side where v_i
   lies and selects there, so the answer is always exact.

``ctx.model_stats[key]`` after them is the list of thresholds, one per model (−inf keeps everything). Other
element-wise scores than |τ_i| can be ranked the same way (``score``): PCB-Merging's whole-model quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .registry import StatsPass
from .selection import largest

SAMPLE_STRIDE = 61
MAX_MODELS = 64
MARGIN_SIGMAS, MARGIN_RANKS = 4.0, 8  # the bracket's half-width in sample ranks: 4 standard deviations + 8


def _magnitudes(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(m - base).abs_().reshape(-1) for m in models]


def _largest(values: torch.Tensor, rank: int) -> float:
    """The ``rank``-th largest (1-based) of ``values``, by selection (``selection.largest`` counts from 0)."""
    return largest(values, [rank - 1])[rank - 1]


def global_topk_passes(ranks: Callable[[dict, int, int], int], key: str = "global",
                       needed: Callable[[dict], bool] | None = None,
                       score: Callable[..., list[torch.Tensor]] | None = None) -> tuple[StatsPass, ...]:
    """Whole-model statistics passes giving ``model_stats[key]``: per entry i the exact ``ranks(params, i, D)``-th
    largest value over the whole model (a rank ≥ D, or ≤ 0: −inf). The entries are |τ_i| per model, or what
    ``score(base, models, params, ctx)`` returns: a list of flat tensors computed element by element (it may read
    ``ctx.model_stats``: an earlier threshold), several entries per model if need be."""
    values = score or (lambda base, models, params, ctx: _magnitudes(base, models))

    def sample(base, models, params, ctx):
        return {f"s{i}": a.reshape(-1) for i, a in enumerate(values(base, models, params, ctx))}

    def brackets(combined, params, ctx):
        total = math.prod(ctx.shape)
        out = []
        for i in range(len([k for k in combined if k.startswith("s")])):
            s = combined[f"s{i}"]
            m = s.numel()
            rank = ranks(params, i, total)
            if rank <= 0 or rank > total or m == 0 or (rank == total and score is None):
                out.append({"rank": rank, "lo": -math.inf, "hi": math.inf, "done": -math.inf})
                continue
            r = rank * m / total
            margin = MARGIN_SIGMAS * math.sqrt(max(r * (1 - r / m), 1.0)) + MARGIN_RANKS
            hi_rank, lo_rank = int(r - margin), int(math.ceil(r + margin))
            hi = math.inf if hi_rank < 1 else _largest(s, hi_rank)
            lo = -math.inf if lo_rank > m else _largest(s, lo_rank)
            out.append({"rank": rank, "lo": lo, "hi": hi, "done": None})
        return _published({**(ctx.model_stats or {}), f"{key}_brackets": out}, key)

    def count(base, models, params, ctx):
        part = {}
        for i, a in enumerate(values(base, models, params, ctx)):
            a = a.reshape(-1)
            b = ctx.model_stats[f"{key}_brackets"][i]
            if b["done"] is not None:
                continue
            part[f"gt{i}"] = (a > b["hi"]).sum(dtype=torch.int64).reshape(1)
            part[f"c{i}"] = a[(a >= b["lo"]) & (a <= b["hi"])]
        return part

    def select(combined, params, ctx):
        stats = dict(ctx.model_stats)
        found = []
        for i, b in enumerate(stats[f"{key}_brackets"]):
            if b["done"] is not None:
                found.append(b)
                continue
            cand = combined.get(f"c{i}", torch.empty(0))
            need = b["rank"] - int(combined[f"gt{i}"]) if f"gt{i}" in combined else b["rank"]
            if 1 <= need <= cand.numel():
                found.append({**b, "done": _largest(cand, need)})
            elif need < 1:  # v_i lies above the bracket: the next pass looks at everything above it
                found.append({**b, "side": "above", "edge": b["hi"], "above": 0})
            else:  # below it: everything below the bracket, the rest of the ranks counted
                found.append({**b, "side": "below", "edge": b["lo"], "above": int(combined[f"gt{i}"]) + cand.numel()})
        stats[f"{key}_brackets"] = found
        return _published(stats, key)

    def fallback_count(base, models, params, ctx):
        part = {}
        for i, a in enumerate(values(base, models, params, ctx)):
            a = a.reshape(-1)
            b = ctx.model_stats[f"{key}_brackets"][i]
            if b["done"] is None:
                part[f"c{i}"] = a[a > b["edge"]] if b["side"] == "above" else a[a < b["edge"]]
        return part

    def fallback_select(combined, params, ctx):
        stats = dict(ctx.model_stats)
        found = []
        for i, b in enumerate(stats[f"{key}_brackets"]):
            if b["done"] is None:
                cand = combined[f"c{i}"]
                found.append({**b, "done": _largest(cand, b["rank"] - b["above"])})
            else:
                found.append(b)
        stats[f"{key}_brackets"] = found
        return _published(stats, key)

    def missed(stats) -> bool:
        return bool(stats) and any(b["done"] is None for b in stats.get(f"{key}_brackets", []))

    concat = tuple(f"c{i}" for i in range(MAX_MODELS))
    return (
        StatsPass(sample, brackets, concat=tuple(f"s{i}" for i in range(MAX_MODELS)), needed=needed,
                  sample_stride=SAMPLE_STRIDE),
        StatsPass(count, select, concat=concat, needed=needed, only_if=missed),
        StatsPass(fallback_count, fallback_select, concat=concat, needed=needed, only_if=missed),
    )


def _published(stats: dict, key: str) -> dict:
    brackets = stats[f"{key}_brackets"]
    if all(b["done"] is not None for b in brackets):
        stats[key] = [b["done"] for b in brackets]
    return stats
