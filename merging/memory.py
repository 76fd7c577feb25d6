"""Keeping a streaming pass's memory flat: glibc's allocator tuned for band-sized buffers, and trimmed when the
resident set outgrows the working set."""

from __future__ import annotations

import os


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed band buffers for reuse instead of unmapping them.

    Every band allocates a few float32 buffers of ~16 MB; by default glibc maps and unmaps each one, and the
    page faults of re-mapping cost more CPU time than the merge arithmetic itself.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: serve blocks below 32 MB (a band is 16 MB) from the heap
        libc.mallopt(-1, 1 << 26)  # M_TRIM_THRESHOLD: keep up to 64 MB of freed heap for reuse
        libc.mallopt(-8, 2)  # M_ARENA_MAX: the reader, writer and compute threads share two heaps, not one each
    except (OSError, AttributeError):
        pass  # not glibc: the merge is only slower


class RetainedMemory:
    """Hands freed heap memory back to the system when the resident set outgrows the working set by ``slack``.

    Band buffers are allocated by the prefetch thread and freed by the compute thread; glibc keeps such chunks
    in the prefetch thread's arena and, with small long-lived allocations between them, reuses them poorly: over
    one 65M-element tensor the resident set grew by 0.4 GB of free memory. ``malloc_trim`` returns it (about
    2 ms); checking the resident set costs a read of /proc/self/statm, so this runs once per band.
    """

    def __init__(self, slack: int = 512 << 20) -> None:
        self.slack = slack
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            import ctypes

            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self.trim = None  # not glibc: nothing to do
        self.limit = self.resident() + slack if self.trim else 0

    def resident(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except (OSError, ValueError, IndexError):
            return 0

    def check(self) -> None:
        if self.trim is None or self.resident() <= self.limit:
            return
        self.trim(0)
        self.limit = self.resident() + self.slack
