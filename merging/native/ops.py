"""The kernels of kernels.c and row_sums.c as torch-in, torch-out functions, each range of a band on its own thread.

Every function takes the inputs as stored (contiguous CPU tensors of one band, any of float32/bfloat16/float16)
and returns new tensors; the callers check ``usable`` first. Each fills its kernel's parameter struct (``abi.py``)
once for the band, with pointers to the band's first elements, and the threads share it: a range is only the
(begin, end) passed alongside.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence

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
from .abi import (
    BracketFound,
    EmrArgs,
    KernelArgs,
    MagnitudeArgs,
    RandomL1Args,
    RowSumsArgs,
    TaskVectorsArgs,
    WeightedSumArgs,
)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _on_ranges(kernel, args: KernelArgs) -> Callable[[int, int], object]:
    """``kernel(&args, lo, hi)`` as a function of the range: the struct is filled once per band, and every thread
    reads the same one, so a range costs only the call."""
    ref = ctypes.byref(args)
    return lambda lo, hi: kernel(ref, lo, hi)


def weighted_sum(inputs: Sequence[torch.Tensor], coefficients: Sequence[float], out_dtype: torch.dtype,
                 divide: float = 1.0) -> tuple[torch.Tensor, int]:
    """Σ_j c_j x_j (/ divide) in float32, stored as ``out_dtype``; also how many stored values are not finite."""
    lib = library()
    flat = [_flat(t) for t in inputs]
    out = torch.empty(inputs[0].shape, dtype=out_dtype)
    args = WeightedSumArgs(x=pointers(flat), dt=codes(flat), c=floats(coefficients), out=pointer(out),
                           m=len(flat), out_dt=DTYPE_CODES[out_dtype], divide=divide)
    return out, sum(run_ranges(_on_ranges(lib.ms_weighted_sum, args), out.numel()))


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
    out = torch.empty(base.shape, dtype=out_dtype)
    mode, thr, tie_end, has_drop = 0, [0.0] * (2 * m), [0] * (2 * m), 0
    keys, limits, start = [0] * m, [0] * m, 0
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
        keys, limits = list(key_values), list(limit_values)
    args = TaskVectorsArgs(base=pointer(base), x=pointers(flat_models), dt=codes(flat_models), w=floats(weights),
                           scale=floats(scales), thr=floats(thr), tie_end=(ctypes.c_int64 * (2 * m))(*tie_end),
                           keys=(ctypes.c_uint64 * m)(*keys), keep24=(ctypes.c_uint32 * m)(*limits),
                           out=pointer(out), start=start, m=m, base_dt=DTYPE_CODES[base.dtype],
                           out_dt=DTYPE_CODES[out_dtype], mode=mode, has_drop=has_drop, consensus=int(consensus),
                           normalize=int(normalize), divisor=divisor, lam=lam)
    return out, sum(run_ranges(_on_ranges(lib.ms_task_vectors, args), out.numel()))


def task_matrices(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τ_i = x_i − b for each model and, last, Σ_i τ_i (summed in model order), in float32 from the inputs as
    stored: the same values as the float32 subtractions and sum in torch, in one read of each input."""
    taus = [weighted_sum([m, base], [1.0, -1.0], torch.float32)[0] for m in models]
    return [*taus, weighted_sum(taus, [1.0] * len(taus), torch.float32)[0]]


ALL_TIES = 1 << 62


def _tie_end(base: torch.Tensor, model: torch.Tensor, threshold: float, ties: int) -> int:
    """Where, in the band, elements equal to ``threshold`` stop counting as above it: ``ties`` is -1 (all of them
    count), 0 (none) or how many count, the first in flat order."""
    if ties < 0:
        return ALL_TIES
    if ties == 0:
        return 0
    args = MagnitudeArgs(base=pointer(base), x=pointer(model), ties=ties, base_dt=DTYPE_CODES[base.dtype],
                         dt=DTYPE_CODES[model.dtype], hi=threshold)
    return library().ms_tie_end(ctypes.byref(args), 0, model.numel())


def strided_magnitudes(base: torch.Tensor | None, model: torch.Tensor, stride: int) -> torch.Tensor:
    """|x − b| (|x| without a base) in float32 of every ``stride``-th element of the flattened band, from 0."""
    flat = _flat(model)
    out = torch.empty(-(-flat.numel() // stride), dtype=torch.float32)
    args = MagnitudeArgs(base=pointer(base), x=pointer(flat), base_dt=DTYPE_CODES[base.dtype] if base is not None
                         else 0, dt=DTYPE_CODES[flat.dtype], out=pointer(out), stride=stride)
    run_ranges(_on_ranges(library().ms_strided_magnitudes, args), out.numel())
    return out


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` (contiguous, on the CPU, float32/bfloat16/float16) are NaN or infinite."""
    flat = _flat(tensor)
    args = MagnitudeArgs(x=pointer(flat), dt=DTYPE_CODES[flat.dtype])
    return sum(run_ranges(_on_ranges(library().ms_count_nonfinite, args), flat.numel()))


def bracket(base: torch.Tensor | None, model: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """How many |x − b| (|x| without a base) exceed ``hi``, and the values within [lo, hi] in flat order."""
    lib = library()
    args = MagnitudeArgs(base=pointer(base), x=pointer(model), base_dt=DTYPE_CODES[base.dtype] if base is not None
                         else 0, dt=DTYPE_CODES[model.dtype], lo=lo, hi=hi)
    ref = ctypes.byref(args)

    def call(start: int, stop: int) -> tuple[int, torch.Tensor]:
        n = stop - start
        cap = min(n, max(SUM_BLOCK, n // 16))
        while True:
            values = torch.empty(cap + 1, dtype=torch.float32)  # the kernel's spare slot at cap
            found = BracketFound(values=pointer(values), cap=cap)
            lib.ms_bracket(ref, start, stop, ctypes.byref(found))
            if found.inside <= cap:
                return found.above, values[:found.inside]
            cap = found.inside  # more candidates than expected: count again with room for all of them

    parts = run_ranges(call, model.numel())
    return sum(p[0] for p in parts), torch.cat([p[1] for p in parts])


def random_l1(base: torch.Tensor, model: torch.Tensor, key: int, keep_limit: int, start: int) -> tuple[float, float]:
    """DARE's L1 norms on one band: Σ|τ| and Σ|τ kept by the draws| (float64, in a thread-independent order)."""
    lib = library()
    blocks = -(-model.numel() // SUM_BLOCK)
    before = torch.zeros(blocks, dtype=torch.float64)
    after = torch.zeros(blocks, dtype=torch.float64)
    args = RandomL1Args(base=pointer(base), x=pointer(model), before=pointer(before), after=pointer(after), key=key,
                        start=start, keep24=keep_limit, base_dt=DTYPE_CODES[base.dtype], dt=DTYPE_CODES[model.dtype])
    run_ranges(_on_ranges(lib.ms_random_l1, args), model.numel())
    return float(before.sum()), float(after.sum())


def emr(base: torch.Tensor, models: Sequence[torch.Tensor], tau_dtype: torch.dtype | None
        ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """EMR on one band (see ``ms_emr``): τ_uni as ``tau_dtype`` and the packed masks (both only when tau_dtype is
    given), and the rescaler sums [Σ|τ_i|] + [Σ M_i|τ_uni|] + [Σ M_i] (float64, 3N)."""
    lib = library()
    m = len(models)
    flat_models = [_flat(t) for t in models]
    n = base.numel()
    tau = torch.empty(base.shape, dtype=tau_dtype) if tau_dtype is not None else None
    masks = [torch.empty((n + 7) // 8, dtype=torch.uint8) for _ in range(m)] if tau_dtype is not None else []
    sums = torch.zeros(-(-n // SUM_BLOCK), 3 * m, dtype=torch.float64)
    args = EmrArgs(base=pointer(base), x=pointers(flat_models), dt=codes(flat_models), tau_out=pointer(tau),
                   masks=pointers(masks) if masks else None, sums=pointer(sums), m=m,
                   base_dt=DTYPE_CODES[base.dtype], tau_dt=DTYPE_CODES[tau_dtype] if tau_dtype is not None else 0)
    run_ranges(_on_ranges(lib.ms_emr, args), n)
    return tau, masks, sums.sum(dim=0)


@functools.cache
def _row_sums_fields(lib: ctypes.CDLL) -> tuple[tuple[str, int], ...]:
    """The fields of a row of ``ms_row_sums``' output as row_sums.c lists them: (name, rank), where rank 0 is one
    value, 1 one per model, 2 one per pair of models."""
    rank, fields = ctypes.c_int(), []
    for i in range(lib.ms_row_sums_fields()):
        name = lib.ms_row_sums_field(i, ctypes.byref(rank))
        fields.append((name.decode(), rank.value))
    return tuple(fields)


def row_sums(base: torch.Tensor, models: Sequence[torch.Tensor], rules: Sequence[tuple[float, int]], emr: bool,
             merged: torch.Tensor | None, uni: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The analysis' per-row sums of one band of (rows, columns) tensors (see ``ms_row_sums``), by name: each
    (rows,) or (rows, M) float64, ``gram`` (rows, M, M). ``rules``: the trim's (threshold, ties) per model.
    The names, their order and their offsets in the kernel's output are the ones row_sums.c reports."""
    lib = library()
    m = len(models)
    rows, cols = base.shape
    fields = _row_sums_fields(lib)
    offsets = (ctypes.c_int64 * (len(fields) + 1))()
    out = torch.zeros(rows, lib.ms_row_sums_layout(m, offsets), dtype=torch.float64)
    flat_models = [_flat(t) for t in models]
    ends = [_tie_end(base, flat_models[i], threshold, ties) for i, (threshold, ties) in enumerate(rules)]
    extras = [None if t is None else t.contiguous() for t in (merged, uni)]
    args = RowSumsArgs(base=pointer(base), x=pointers(flat_models), dt=codes(flat_models),
                       thr=floats([r[0] for r in rules]), tie_end=(ctypes.c_int64 * m)(*ends),
                       merged=pointer(extras[0]), uni=pointer(extras[1]), out=pointer(out), cols=cols, m=m,
                       base_dt=DTYPE_CODES[base.dtype], emr=int(emr),
                       merged_dt=DTYPE_CODES[merged.dtype] if merged is not None else 0,
                       uni_dt=DTYPE_CODES[uni.dtype] if uni is not None else 0)
    run_ranges(_on_ranges(lib.ms_row_sums, args), rows, align=1)
    return {name: out[:, offsets[i]:offsets[i + 1]].reshape(rows, *(m,) * rank)
            for i, (name, rank) in enumerate(fields)}
