"""What the analysis reads: whole tensors or row bands as a merge does, or a seeded sample of whole rows.

Sampled mode reads ``fraction`` of each tensor's rows (first-dimension slices, at least 2) through
``CheckpointSource.read_rows`` (contiguous bands: HTTP range requests on the Hub); tensors of at most
``WHOLE_TENSOR_BYTES`` per input (norms, biases) are read whole. Rows are drawn from a generator seeded by
(seed, tensor name): the same seed gives the same rows.
"""

from __future__ import annotations

import torch

from ..bands import Band
from ..engine import Executor
from ..methods.registry import TensorContext
from ..native.rng import stable_seed
from ..plan import TensorTask
from ..sources import CheckpointSource

SAMPLE_THRESHOLD_BYTES = 2 * 10**9  # above this many input bytes (base + fine-tunes), sampling is the default
DEFAULT_SAMPLE_FRACTION = 0.05
WHOLE_TENSOR_BYTES = 1 << 20  # in sampled mode, tensors of at most 1 MiB per input are read whole


def tensor_rows(task: TensorTask) -> int:
    """The rows a tensor's statistics stand for: its shared (vocabulary) rows, else all (a scalar is one row)."""
    return task.shared_rows or (task.spec.shape[0] if task.spec.shape else 1)


def choose_rows(task: TensorTask, spec_bytes: int, fraction: float, seed: int, whole_bytes: int) -> list[int] | None:
    """The sampled rows of one tensor, sorted, or None to read it whole."""
    shape = task.spec.shape
    n_rows = tensor_rows(task)
    if not shape or spec_bytes <= whole_bytes or n_rows <= 2:
        return None
    k = min(n_rows, max(2, round(fraction * n_rows)))
    if k >= n_rows:
        return None
    gen = torch.Generator().manual_seed(stable_seed(seed, "analysis:" + task.name))
    return sorted(torch.randperm(n_rows, generator=gen)[:k].tolist())


def sampled_rows(tasks: list[TensorTask], sources: dict[str, CheckpointSource], fraction: float, seed: int,
                 whole_bytes: int) -> dict[str, list[int]]:
    """Per tensor read by sampled rows, those rows (none when ``fraction`` is 1)."""
    chosen: dict[str, list[int]] = {}
    if fraction >= 1:
        return chosen
    for task in tasks:
        rows = choose_rows(task, sources[task.base.model].specs()[task.base.name].nbytes, fraction, seed,
                           whole_bytes)
        if rows is not None:
            chosen[task.name] = rows
    return chosen


class AnalysisExecutor(Executor):
    """The engine's executor (prefetch, progress, cancel, statistics passes), reading the sampled rows of tasks
    that have them; a whole-tensor unit's context has the shape of what was read of it."""

    def __init__(self, *args, sampled_rows: dict[str, list[int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampled_rows = sampled_rows

    def bands(self, task: TensorTask, elementwise: bool) -> list[Band]:
        """Sampled tensors are one unit (their rows are read at once); the rest go by the engine's row bands."""
        return [None] if task.name in self.sampled_rows else super().bands(task, elementwise)

    def read_input(self, task: TensorTask, ref, band: Band) -> torch.Tensor:
        rows = self.sampled_rows.get(task.name)
        if rows is None:
            return super().read_input(task, ref, band)
        return self.sources[ref.model].read_rows(ref.name, rows)

    def unit_bytes(self, task: TensorTask, band: Band) -> int:
        rows = self.sampled_rows.get(task.name)
        whole = super().unit_bytes(task, band)
        return whole if rows is None else whole * len(rows) // task.spec.shape[0]

    def inputs(self, task: TensorTask, base: torch.Tensor, models: list[torch.Tensor]):
        """Float32 compute tensors: shared (vocabulary) rows only for whole reads; samples already are."""
        keep = None if task.name in self.sampled_rows else task.shared_rows
        return self.to_compute(base, keep), [self.to_compute(m, keep) for m in models]

    def read_shape(self, task: TensorTask) -> tuple[int, ...]:
        """The shape of a whole-tensor unit as computed on: its sampled rows, or its shared rows."""
        shape = tuple(task.spec.shape)
        rows = self.sampled_rows.get(task.name)
        if rows is not None:
            return (len(rows), *shape[1:])
        return (task.shared_rows, *shape[1:]) if task.shared_rows is not None else shape

    def context(self, task: TensorTask, band: Band, reduced, stats) -> TensorContext:
        """A whole-tensor unit is the tensor its methods and statistics passes see: sampled rows stand for it (their
        thresholds are estimated from the sample)."""
        ctx = super().context(task, band, reduced, stats)
        if band is None:
            ctx.shape = self.read_shape(task)
        return ctx
