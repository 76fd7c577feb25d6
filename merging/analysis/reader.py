"""What the analysis reads: whole tensors or row bands as a merge does, or a seeded sample of whole rows.

Sampled mode reads ``fraction`` of each tensor's rows (first-dimension slices, at least 2) through
``CheckpointSource.read_rows`` (contiguous bands: HTTP range requests on the Hub); tensors of at most
``WHOLE_TENSOR_BYTES`` per input (norms, biases) are read whole. The rows come in runs: a tensor's rows are cut
into clusters of ``run`` consecutive rows (about ``RUN_BYTES`` each, and at least ``MIN_RUNS`` of them drawn),
and whole clusters are drawn, from a generator seeded by (seed, tensor name): the same seed gives the same rows.
Random single rows lay tens of kB apart, so a range request either fetched one row (a round trip for 2-8 kB) or,
coalesced, the gaps between them too (the Hub sent 16 x the bytes used); a run is one request of its own bytes.
The intervals count clusters, not rows (``estimate.RowMoments``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
RUN_BYTES = 1 << 18  # a sampled cluster of rows is about this much of one input: one range request
MIN_RUNS = 8  # ... unless that leaves fewer clusters than this to draw: then shorter runs


@dataclass(frozen=True)
class RowSample:
    """A tensor's sampled rows (sorted): whole clusters of ``run`` consecutive rows, cluster j being rows
    [j·run, (j+1)·run) (the tensor's last one may be shorter)."""

    rows: list[int]
    run: int


def tensor_rows(task: TensorTask) -> int:
    """The rows a tensor's statistics stand for: its shared (vocabulary) rows, else all (a scalar is one row)."""
    return task.shared_rows or (task.spec.shape[0] if task.spec.shape else 1)


def choose_rows(task: TensorTask, spec_bytes: int, fraction: float, seed: int, whole_bytes: int) -> RowSample | None:
    """The sampled rows of one tensor, or None to read it whole."""
    shape = task.spec.shape
    n_rows = tensor_rows(task)
    if not shape or spec_bytes <= whole_bytes or n_rows <= 2:
        return None
    k = min(n_rows, max(2, round(fraction * n_rows)))
    run = max(1, min(RUN_BYTES // max(1, spec_bytes // shape[0]), k // MIN_RUNS))
    clusters = -(-n_rows // run)
    drawn = min(clusters, max(2, round(k / run)))
    if drawn >= clusters:
        return None
    gen = torch.Generator().manual_seed(stable_seed(seed, "analysis:" + task.name))
    picked = sorted(torch.randperm(clusters, generator=gen)[:drawn].tolist())
    return RowSample([r for c in picked for r in range(c * run, min((c + 1) * run, n_rows))], run)


def sampled_rows(tasks: list[TensorTask], sources: dict[str, CheckpointSource], fraction: float, seed: int,
                 whole_bytes: int) -> dict[str, RowSample]:
    """Per tensor read by sampled rows, those rows (none when ``fraction`` is 1)."""
    chosen: dict[str, RowSample] = {}
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

    def __init__(self, *args, sampled_rows: dict[str, RowSample], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampled_rows = sampled_rows

    def bands(self, task: TensorTask, elementwise: bool) -> list[Band]:
        """Sampled tensors are one unit (their rows are read at once); the rest go by the engine's row bands."""
        return [None] if task.name in self.sampled_rows else super().bands(task, elementwise)

    def read_input(self, task: TensorTask, ref, band: Band) -> torch.Tensor:
        sample = self.sampled_rows.get(task.name)
        if sample is None:
            return super().read_input(task, ref, band)
        return self.sources[ref.model].read_rows(ref.name, sample.rows)

    def unit_bytes(self, task: TensorTask, band: Band) -> int:
        sample = self.sampled_rows.get(task.name)
        whole = super().unit_bytes(task, band)
        return whole if sample is None else whole * len(sample.rows) // task.spec.shape[0]

    def sample_run(self, task: TensorTask) -> int:
        """The rows per cluster of what is read of a whole-tensor unit (1: every row is its own)."""
        sample = self.sampled_rows.get(task.name)
        return 1 if sample is None else sample.run

    def inputs(self, task: TensorTask, base: torch.Tensor, models: list[torch.Tensor]):
        """Float32 compute tensors: shared (vocabulary) rows only for whole reads; samples already are."""
        keep = None if task.name in self.sampled_rows else task.shared_rows
        return self.to_compute(base, keep), [self.to_compute(m, keep) for m in models]

    def read_shape(self, task: TensorTask) -> tuple[int, ...]:
        """The shape of a whole-tensor unit as computed on: its sampled rows, or its shared rows."""
        shape = tuple(task.spec.shape)
        sample = self.sampled_rows.get(task.name)
        if sample is not None:
            return (len(sample.rows), *shape[1:])
        return (task.shared_rows, *shape[1:]) if task.shared_rows is not None else shape

    def context(self, task: TensorTask, band: Band, reduced, stats) -> TensorContext:
        """A whole-tensor unit is the tensor its methods and statistics passes see: sampled rows stand for it (their
        thresholds are estimated from the sample)."""
        ctx = super().context(task, band, reduced, stats)
        if band is None:
            ctx.shape = self.read_shape(task)
        return ctx
