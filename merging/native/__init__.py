"""Fused CPU kernels (``kernels.c``, and ``row_sums.c`` for the analysis), compiled on first use with the system C
compiler and loaded with ctypes; ``abi.py`` mirrors their parameter structs and checks them against the library.

The torch code in ``merging/methods`` is the reference and the fallback: it runs on CUDA, where no compiler is
found, or with ``MERGESCOPE_NATIVE=0``. On the CPU these kernels read each bf16/f16/f32 input once and write the
output dtype directly, which cuts a merge's memory traffic several times over (see the README's performance table).

The shared library is cached under ``$MERGESCOPE_CACHE`` (default ``~/.cache/mergescope``), named by a hash of the
sources, the compiler and the CPU, and written atomically, so concurrent first runs do not collide.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from . import abi

HERE = Path(__file__).parent
SOURCES = (HERE / "kernels.c", HERE / "row_sums.c", HERE / "abi.c")  # compiled together into one library
HEADERS = (HERE / "kernels.h",)  # hashed with the sources: a change there changes the library
SUM_BLOCK = 65536  # kernels.c returns partial sums per this many elements
MAX_INPUTS = 32
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# -fno-trapping-math lets GCC compute both sides of a select (`keep ? t * w : 0`) and blend them: with FP traps
# assumed, it left every such loop scalar and branchy (the TIES kernel ran 7x slower). Nothing here reads the
# FP exception flags, and the values computed are the same.
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")

log = logging.getLogger("mergescope.native")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_why_not = ""


def _cache_dir() -> Path:
    root = os.environ.get("MERGESCOPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mergescope")
    return Path(root)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for arch in (("-march=native",), ()):  # -march=native is refused by some compilers (and CPUs)
            done = subprocess.run([compiler, *FLAGS, *arch, "-o", str(out), *map(str, SOURCES)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(out, target)
                return
        raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, compiling them the first time; None when disabled, when no compiler works, or when the
    library's structs are not the ones ``abi.py`` passes (see why_not)."""
    global _lib, _tried, _why_not
    if disabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not compiler:
            _why_not = "no C compiler found"
            return None
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
            text = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
            key = hashlib.sha256(text + version.encode() + _cpu_model().encode()
                                 + " ".join(FLAGS).encode()).hexdigest()[:16]
            target = _cache_dir() / f"kernels-{key}.so"
            if not target.exists():
                started = time.monotonic()
                try:
                    _compile(compiler, target)
                except PermissionError:
                    target = Path(tempfile.gettempdir()) / "mergescope" / target.name
                    if not target.exists():
                        _compile(compiler, target)
                log.info("built the merge kernels in %.1f s: %s", time.monotonic() - started, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            _why_not = f"could not build the kernels: {exc}"
            log.warning("%s; merges run in torch instead (slower)", _why_not)
            return None
        problems = abi.mismatches(lib)
        if problems:  # calling with a struct C reads differently would corrupt memory, not raise
            _why_not = f"kernels.h and merging/native/abi.py disagree: {'; '.join(problems)}"
            log.error("%s; merges run in torch instead (slower)", _why_not)
            return None
        _lib = abi.declare(lib)
        return _lib


def disabled() -> bool:
    """``MERGESCOPE_NATIVE=0`` switches the kernels off (read at every call, so a test can flip it)."""
    return os.environ.get("MERGESCOPE_NATIVE", "1") == "0"


def why_not() -> str:
    """Why ``library()`` is None ("" when it loaded or was not tried)."""
    return "disabled by MERGESCOPE_NATIVE=0" if disabled() else _why_not


def usable(device: torch.device, *tensors: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels can take these tensors: CPU, contiguous, a dtype they read, at most MAX_INPUTS."""
    if device.type != "cpu" or len(tensors) > MAX_INPUTS + 1:
        return False
    if out_dtype is not None and out_dtype not in DTYPE_CODES:
        return False
    for t in tensors:
        if t is not None and (t.dtype not in DTYPE_CODES or not t.is_contiguous() or t.device.type != "cpu"):
            return False
    return library() is not None


def threads() -> int:
    """Threads a kernel call is split over: torch's thread count, or what it was before ``own_cores``."""
    return max(1, _saved_threads or torch.get_num_threads())


_owners = 0
_saved_threads: int | None = None


@contextmanager
def own_cores(active: bool = True):
    """While a pass's heavy work runs in these kernels, torch's own ops (statistics on samples and candidates, the
    analysis' float64 totals) run on one thread, and the kernels keep every core.

    torch's OpenMP workers spin between ops: alternating with the kernel threads on the same cores, a TIES merge's
    small torch ops took 10-50x longer and its statistics passes 2-4x (on 2 cores, with other work on the
    machine: top-k tie accounting 1.0 s instead of 0.02 s, a whole merge 8.3-9.3 s instead of 3.4-5.8 s). Nested
    and concurrent uses share one saved setting, restored when the last one ends."""
    global _owners, _saved_threads
    if not active:
        yield
        return
    with _lock:
        if _owners == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _owners += 1
    try:
        yield
    finally:
        with _lock:
            _owners -= 1
            if _owners == 0:
                torch.set_num_threads(_saved_threads)
                _saved_threads = None


_lenders = 0


@contextmanager
def torch_cores():
    """Within ``own_cores``, a stretch where torch alone computes (the spectral diagnostics' matmuls, no kernel
    running): torch gets every core back for it (on 2 cores those matmuls took 1.6 x as long on one thread)."""
    global _lenders
    with _lock:
        _lenders += 1
        if _owners and _lenders == 1:
            torch.set_num_threads(_saved_threads)
    try:
        yield
    finally:
        with _lock:
            _lenders -= 1
            if _owners and _lenders == 0:
                torch.set_num_threads(1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="kernel")
    return _pool


def ranges(n: int, align: int = SUM_BLOCK, parts: int | None = None) -> list[tuple[int, int]]:
    """[0, n) cut into about ``parts`` (default: one per thread) ranges whose starts are multiples of ``align``."""
    per_part = -(-n // (parts or threads()))
    step = max(align, -(-per_part // align) * align)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)] or [(0, 0)]


def run_ranges(call: Callable[[int, int], object], n: int, align: int = SUM_BLOCK) -> list:
    """``call(lo, hi)`` over ``ranges(n, align)`` on the kernel threads (ctypes releases the GIL); results in order."""
    spans = ranges(n, align)
    if len(spans) == 1:
        return [call(*spans[0])]
    futures = [_executor().submit(call, lo, hi) for lo, hi in spans]
    return [f.result() for f in futures]


def pointer(tensor: torch.Tensor | None, offset: int = 0) -> int | None:
    """The address of element ``offset`` of a contiguous tensor (None for no tensor)."""
    if tensor is None:
        return None
    return tensor.data_ptr() + offset * tensor.element_size()


def pointers(tensors: Sequence[torch.Tensor], offset: int = 0):
    return (ctypes.c_void_p * len(tensors))(*[pointer(t, offset) for t in tensors])


def codes(tensors: Sequence[torch.Tensor]):
    return (ctypes.c_int32 * len(tensors))(*[DTYPE_CODES[t.dtype] for t in tensors])


def floats(values: Sequence[float]):
    return (ctypes.c_float * len(values))(*values)
