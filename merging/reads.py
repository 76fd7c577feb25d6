"""What a streaming pass reads: each unit's inputs (a tensor, or a row band of one), read ahead of their use, and
held between a tensor's passes.

``UnitReads`` is the reading half of the engine's ``Executor``. A pass (the merge, a reduction, the analysis)
walks its units in order inside ``reading()``: before each unit's compute, the units after it are submitted to a
``merging.sources.readahead.ReadAhead`` (one unit ahead from local disks; from the Hub every input of as many
upcoming units as ``MERGESCOPE_READAHEAD`` bytes allow, on the sources' connections). A tensor's statistics passes
run inside the same read-ahead: a band it already asked for is taken from there, never read a second time, and
bands of a tensor whose inputs total at most ``bands.HOLD_BYTES`` are held from the first statistics pass to the
merge pass (read once for all of them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .bands import Band
from .plan import TensorTask
from .sources import CheckpointSource
from .sources.readahead import ReadAhead, window_bytes


class UnitReads:
    """A pass's reads over ``sources``: read-ahead, held bands, and the one place inputs are read."""

    def __init__(self, sources: dict[str, CheckpointSource]) -> None:
        self.sources = sources
        self._held: dict[tuple, tuple] = {}  # (tensor, band) -> inputs kept between a tensor's passes
        self.read_workers = max([s.read_concurrency for s in sources.values()] or [1])
        self._ahead: ReadAhead | None = None  # the running pass's reads in flight, keyed (tensor, band)
        self._input_bytes: dict[str, int] = {}

    def held_inputs(self, task: TensorTask, band: tuple[int, int] | None, hold: bool):
        """A band for a statistics pass: from memory when an earlier pass held it, else read (and held if asked),
        so that a tensor's later passes and its merge pass do not read it again."""
        key = (task.name, band)
        inputs = self._held.get(key)
        if inputs is None:
            inputs = self.take_inputs(task, band)
            if hold:
                self._held[key] = inputs
        return inputs

    def unit_inputs(self, task: TensorTask, band: tuple[int, int] | None = None):
        """A unit's inputs for the merge pass: the statistics passes' held copy when there is one."""
        held = self._held.pop((task.name, band), None)
        return held if held is not None else self.take_inputs(task, band)

    def take_inputs(self, task: TensorTask, band: Band):
        """A unit's inputs from the read-ahead (asked for now if it was not yet), or read here outside a pass."""
        if self._ahead is None:
            return self.read_inputs(task, band)
        key = (task.name, band)
        if not self._ahead.has(key):
            self._ahead.submit(key, self.input_reads(task, band), self.unit_bytes(task, band))
        return self._split(task, self._ahead.take(key))

    @contextmanager
    def reading(self):
        """The read-ahead of a pass: this pass's own, or the enclosing one (a statistics pass inside the merge)."""
        if self._ahead is not None:
            yield self._ahead
            return
        window = window_bytes() if self.read_workers > 1 else 0
        with ReadAhead(self.read_workers, window) as ahead:
            self._ahead = ahead
            try:
                yield ahead
            finally:
                self._ahead = None

    def _upcoming(self, units):
        """(key, reads, bytes) of the units a pass needs next, for ``ReadAhead.top_up`` (held ones need no read)."""
        for task, band in units:
            key = (task.name, band)
            if key not in self._held:
                yield key, lambda t=task, b=band: self.input_reads(t, b), self.unit_bytes(task, band)

    def unit_bytes(self, task: TensorTask, band: Band) -> int:
        """Stored bytes of a unit's inputs (its share of the tensor's rows for a band)."""
        total = self._input_bytes.get(task.name)
        if total is None:
            refs = ([task.base] if task.base else []) + list(task.inputs)
            total = self._input_bytes[task.name] = sum(self.sources[r.model].specs()[r.name].nbytes for r in refs)
        if band is None or not task.spec.shape or not task.spec.shape[0]:
            return total
        return total * (band[1] - band[0]) // task.spec.shape[0]

    def input_reads(self, task: TensorTask, band: Band) -> list:
        """One read per input of the unit (base first), each a callable, so that they may run at once."""
        refs = ([task.base] if task.base else []) + list(task.inputs)
        return [lambda r=r: self.read_input(task, r, band) for r in refs]

    def read_input(self, task: TensorTask, ref, band: Band) -> torch.Tensor:
        """One input of a unit as stored, on the CPU."""
        return self.sources[ref.model].read(ref.name, band)

    def read_inputs(self, task: TensorTask, band: tuple[int, int] | None = None):
        """The task's tensors (or one row band of them) as stored, on the CPU."""
        return self._split(task, [read() for read in self.input_reads(task, band)])

    @staticmethod
    def _split(task: TensorTask, parts: list) -> tuple:
        return (parts[0], parts[1:]) if task.base else (None, parts)
