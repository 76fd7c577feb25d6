"""Reads asked for before they are needed: several at once, within a byte budget, each taken exactly once.

A streaming pass walks its units (a tensor, or a row band of one) in order and computes on one at a time; reading
the next units meanwhile hides the read time. From a local disk one unit ahead on one thread is enough (the page
cache answers at GB/s). From the Hub each read is an HTTP range request that costs a round trip before its first
byte, so a link is only full with many bytes requested at once: the engine then submits every input of several
upcoming units (other tensors, other models) while their total stays within ``window`` bytes, on as many threads
as the sources have connections (``CheckpointSource.read_concurrency``).

Each submitted unit is keyed (the engine uses (tensor, band)); whoever needs it first takes it, the merge pass or
a statistics pass of the same tensor, so a unit read ahead is never read a second time. ``close`` cancels what
has not started and waits for what has, so no read outlives the pass that asked for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import SourceError

WINDOW_ENV = "MERGESCOPE_READAHEAD"
DEFAULT_WINDOW = 256 << 20  # bytes read ahead from sources that read over a network


def window_bytes(default: int = DEFAULT_WINDOW) -> int:
    """The read-ahead budget for network sources: ``MERGESCOPE_READAHEAD`` (bytes, or a size like 512MB)."""
    text = os.environ.get(WINDOW_ENV, "").strip()
    if not text:
        return default
    import re

    m = re.fullmatch(r"([0-9.]+)\s*([KMG]?)i?B?", text, re.IGNORECASE)
    if not m:
        raise SourceError(f"{WINDOW_ENV}={text!r}: give a size such as 256MB")
    return int(float(m[1]) * 1024 ** " KMG".index((m[2] or " ").upper()))


class ReadAhead:
    """Units of reads in flight, keyed, at most ``window`` bytes of them (always at least one)."""

    def __init__(self, workers: int = 1, window: int = 0) -> None:
        self.workers = max(1, workers)
        self.window = window
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="read-ahead")
        self._pending: dict[Hashable, tuple[list[Future], int]] = {}
        self._bytes = 0

    @property
    def bytes_pending(self) -> int:
        return self._bytes

    def has(self, key: Hashable) -> bool:
        return key in self._pending

    def room(self, nbytes: int) -> bool:
        """Whether a unit of ``nbytes`` fits the budget now (an empty read-ahead always takes one)."""
        return not self._pending or self._bytes + nbytes <= self.window

    def submit(self, key: Hashable, reads: list[Callable[[], object]], nbytes: int) -> None:
        """Start the unit's reads (each on its own thread when there are several workers)."""
        if key in self._pending:
            return
        if self.workers == 1:  # one thread: the unit's reads one after the other, as one task
            futures = [self._pool.submit(lambda: [read() for read in reads])]
        else:
            futures = [self._pool.submit(read) for read in reads]
        self._pending[key] = (futures, nbytes)
        self._bytes += nbytes

    def top_up(self, units) -> None:
        """Submit units from ``units`` (an iterable of (key, reads, nbytes), in the order they will be needed; ``reads``
        a callable giving the unit's list of reads) until the budget is full; units already in flight are skipped."""
        for key, reads, nbytes in units:
            if key in self._pending:
                continue
            if not self.room(nbytes):
                return
            self.submit(key, reads(), nbytes)

    def take(self, key: Hashable) -> list | None:
        """The unit's results in submission order (waiting for them), or None if it was never submitted."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return None
        futures, nbytes = entry
        self._bytes -= nbytes
        try:
            if self.workers == 1:
                return futures[0].result()
            return [f.result() for f in futures]
        except BaseException:
            _abandon(futures)
            raise

    def close(self) -> None:
        for futures, _ in self._pending.values():
            _abandon(futures)
        self._pending.clear()
        self._bytes = 0
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _abandon(futures: list[Future]) -> None:
    for f in futures:
        f.cancel()
