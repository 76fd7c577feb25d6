"""The kernels of kernels.c as torch-in, torch-out functions, each range of a band on its own thread.

Every function takes the inputs as stored (contiguous CPU tensors of one band, any of float32/bfloat16/float16)
and returns new tensors; the callers check ``usable`` first.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from . import (
    DTYPE_CODES,
    SUM_BLOCK,
    codes,
    floats,
    library,
    pointer,
    pointers,
    run_ranges,
)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def weighted_sum(inputs: Sequence[torch.Tensor], coefficients: Sequence[float], out_dtype: torch.dtype,
                 divide: float = 1.0) -> tuple[torch.Tensor, int]:
    """Σ_j c_j x_j (/ divide) in float32, stored as ``out_dtype``; also how many stored values are not finite."""
    lib = library()
    flat = [_flat(t) for t in inputs]
    out = torch.empty(inputs[0].shape, dtype=out_dtype)
    out_flat, c, dts = _flat(out), floats(coefficients), codes(flat)

    def call(lo: int, hi: int) -> int:
        return lib.ms_weighted_sum(hi - lo, len(flat), pointers(flat, lo), dts, c, divide, pointer(out_flat, lo),
                                   DTYPE_CODES[out_dtype])

    return out, sum(run_ranges(call, out.numel()))


def task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                 scales: Sequence[float], out_dtype: torch.dtype, *, cuts=None, draws=None, consensus: bool,
                 normalize: bool, divisor: float, lam: float) -> tuple[torch.Tensor, int]:
    """The task-vector family's merge of one band (see ``ms_task_vectors`` in kernels.c).

    ``cuts``: per model a (threshold, ties) pair to keep and, optionally, one to drop, where ties is -1 (every
    element equal to the threshold counts as above it), 0 (none) or how many do, counting from the band's start.
    ``draws``: (keys, keep limits, flat index of the band's first element) for DARE's random drop.
    """
    lib = library()
    m = len(models)
    flat_models = [_flat(t) for t in models]
    flat_base = _flat(base)
    out = torch.empty(base.shape, dtype=out_dtype)
    out_flat, dts = _flat(out), codes(flat_models)
    w, s = floats(weights), floats(scales)
    mode, thr, tie_end, has_drop = 0, floats([0.0] * 2 * m), (ctypes.c_int64 * (2 * m))(), 0
    keys, limits, start = (ctypes.c_uint64 * m)(), (ctypes.c_uint32 * m)(), 0
    if cuts is not None:
        mode = 1
        has_drop = int(any(len(c) > 1 for c in cuts))
        for i, model_cuts in enumerate(cuts):
            for j, (threshold, kept_ties) in enumerate(model_cuts):
                thr[2 * i + j] = threshold
                tie_end[2 * i + j] = _tie_end(base, flat_models[i], threshold, kept_ties)
    elif draws is not None:
        mode = 2
        key_values, limit_values, start = draws
        keys[:], limits[:] = list(key_values), list(limit_values)

    def call(lo: int, hi: int) -> int:
        ends = (ctypes.c_int64 * (2 * m))(*[e - lo for e in tie_end])
        return lib.ms_task_vectors(hi - lo, m, pointer(flat_base, lo), DTYPE_CODES[base.dtype],
                                   pointers(flat_models, lo), dts, w, s, mode, thr, ends, has_drop, keys, limits,
                                   start + lo, int(consensus), int(normalize), divisor, lam, pointer(out_flat, lo),
                                   DTYPE_CODES[out_dtype])

    return out, sum(run_ranges(call, out.numel()))


ALL_TIES = 1 << 62


def _tie_end(base: torch.Tensor, model: torch.Tensor, threshold: float, ties: int) -> int:
    """Where, in the band, elements equal to ``threshold`` stop counting as above it: ``ties`` is -1 (all of them
    count), 0 (none) or how many count, the first in flat order."""
    if ties < 0:
        return ALL_TIES
    if ties == 0:
        return 0
    flat_base = _flat(base)
    return library().ms_tie_end(model.numel(), pointer(flat_base), DTYPE_CODES[base.dtype], pointer(model),
                                DTYPE_CODES[model.dtype], threshold, ties)


def bracket(base: torch.Tensor | None, model: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """How many |x − b| (|x| without a base) exceed ``hi``, and the values within [lo, hi] in flat order."""
    lib = library()
    flat, flat_base = _flat(model), None if base is None else _flat(base)
    base_code = DTYPE_CODES[base.dtype] if base is not None else 0

    def call(start: int, stop: int) -> tuple[int, torch.Tensor]:
        n = stop - start
        cap = min(n, max(SUM_BLOCK, n // 16))
        while True:
            found = torch.empty(cap, dtype=torch.float32)
            above, inside = ctypes.c_int64(), ctypes.c_int64()
            lib.ms_bracket(n, pointer(flat_base, start), base_code, pointer(flat, start), DTYPE_CODES[model.dtype],
                           lo, hi, pointer(found), cap, ctypes.byref(above), ctypes.byref(inside))
            if inside.value <= cap:
                return above.value, found[:inside.value]
            cap = inside.value  # more candidates than expected: count again with room for all of them

    parts = run_ranges(call, flat.numel())
    return sum(p[0] for p in parts), torch.cat([p[1] for p in parts])


def random_l1(base: torch.Tensor, model: torch.Tensor, key: int, keep_limit: int, start: int) -> tuple[float, float]:
    """DARE's L1 norms on one band: Σ|τ| and Σ|τ kept by the draws| (float64, in a thread-independent order)."""
    lib = library()
    flat, flat_base = _flat(model), _flat(base)
    blocks = -(-flat.numel() // SUM_BLOCK)
    before = torch.zeros(blocks, dtype=torch.float64)
    after = torch.zeros(blocks, dtype=torch.float64)

    def call(lo: int, hi: int) -> None:
        lib.ms_random_l1(hi - lo, pointer(flat_base, lo), DTYPE_CODES[base.dtype], pointer(flat, lo),
                         DTYPE_CODES[model.dtype], key, keep_limit, start + lo, pointer(before, lo // SUM_BLOCK),
                         pointer(after, lo // SUM_BLOCK))

    run_ranges(call, flat.numel())
    return float(before.sum()), float(after.sum())


def emr(base: torch.Tensor, models: Sequence[torch.Tensor], tau_dtype: torch.dtype | None
        ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """EMR on one band (see ``ms_emr``): τ_uni as ``tau_dtype`` and the packed masks (both only when tau_dtype is
    given), and the rescaler sums [Σ|τ_i|] + [Σ M_i|τ_uni|] + [Σ M_i] (float64, 3N)."""
    lib = library()
    m = len(models)
    flat_models, flat_base = [_flat(t) for t in models], _flat(base)
    n = flat_base.numel()
    dts = codes(flat_models)
    tau = torch.empty(base.shape, dtype=tau_dtype) if tau_dtype is not None else None
    masks = [torch.empty((n + 7) // 8, dtype=torch.uint8) for _ in range(m)] if tau_dtype is not None else []
    blocks = -(-n // SUM_BLOCK)
    sums = torch.zeros(blocks, 3 * m, dtype=torch.float64)
    tau_flat = None if tau is None else _flat(tau)

    def call(lo: int, hi: int) -> None:
        mask_ptrs = (ctypes.c_void_p * m)(*[pointer(mk, lo // 8) for mk in masks]) if masks else None
        lib.ms_emr(hi - lo, m, pointer(flat_base, lo), DTYPE_CODES[base.dtype], pointers(flat_models, lo), dts,
                   pointer(tau_flat, lo), DTYPE_CODES[tau_dtype] if tau_dtype is not None else 0, mask_ptrs,
                   pointer(sums[lo // SUM_BLOCK]))

    run_ranges(call, n)
    return tau, masks, sums.sum(dim=0)


def row_sums(base: torch.Tensor, models: Sequence[torch.Tensor], rules: Sequence[tuple[float, int]], emr: bool,
             merged: torch.Tensor | None, uni: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The analysis' per-row sums of one band of (rows, columns) tensors (see ``ms_row_sums``), by name: each
    (rows,) or (rows, M) float64, ``gram`` (rows, M, M). ``rules``: the trim's (threshold, ties) per model."""
    lib = library()
    m = len(models)
    rows, cols = base.shape
    k_out = 1 + m + m * m + m + 4 + 5 * m + 1 + m + 3 * m  # the columns of ms_row_sums, as ``layout`` below
    out = torch.zeros(rows, k_out, dtype=torch.float64)
    flat_base, flat_models = _flat(base), [_flat(t) for t in models]
    thr = floats([r[0] for r in rules])
    ends = [_tie_end(base, flat_models[i], threshold, ties) for i, (threshold, ties) in enumerate(rules)]
    dts = codes(flat_models)
    extras = [None if t is None else _flat(t.contiguous()) for t in (merged, uni)]

    def call(lo: int, hi: int) -> None:
        first = lo * cols
        tie_end = (ctypes.c_int64 * m)(*[e - first for e in ends])
        lib.ms_row_sums(hi - lo, cols, m, pointer(flat_base, first), DTYPE_CODES[base.dtype],
                        pointers(flat_models, first), dts, thr, tie_end, int(emr),
                        pointer(extras[0], first), DTYPE_CODES[merged.dtype] if merged is not None else 0,
                        pointer(extras[1], first), DTYPE_CODES[uni.dtype] if uni is not None else 0,
                        pointer(out[lo]), k_out)

    run_ranges(call, rows, align=1)
    # (name, shape of one row's entry): () one value, (m,) one per model, (m, m) the Gram matrix
    layout = [("base_sq", ()), ("weight_sq", (m,)), ("gram", (m, m)), ("abs", (m,)), ("both", ()),
              ("eligible", ()), ("against", ()), ("mass", ()), ("count", (m,)), ("abs_masked", (m,)),
              ("masked_sq", (m,)), ("dot", (m,)), ("masked_dot", (m,)), ("uni_sq", ()), ("dist", (m,)),
              ("own_abs_masked", (m,)), ("own_masked_sq", (m,)), ("own_masked_dot", (m,))]
    result, at = {}, 0
    for name, shape in layout:
        width = 1
        for size in shape:
            width *= size
        result[name] = out[:, at:at + width].reshape(rows, *shape)
        at += width
    return result
