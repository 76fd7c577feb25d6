"""Pre-flight resource check: refuse a merge up front when it cannot fit in free memory or on the output's disk.

Without it a merge that is too big for the machine is killed by the OOM killer midway (no message, on a Space
a restarted container) or fails when the disk fills. The estimates come from the plan alone (shapes and dtypes,
no weights read), following how the engine runs (merging/engine.py, merging/bands.py):

    unit      = the rows processed at once: the largest of ``bands.row_bands`` for element-wise methods and
                copies (about BAND_ELEMENTS elements, at least 8 rows), the whole tensor otherwise (and for
                vocabulary-mismatch tensors)
    memory    ≈ PROCESS_OVERHEAD + max over tasks of
                  unit · ( 2 · stored bytes per element · inputs        (the current unit and the prefetched one)
                         + 3 · output bytes per element                 (writes in flight)
                         + 4 B · (k · inputs + FIXED_BUFFERS) )         (float32 copies, results, temporaries)
                + 4 B · tensor · inputs / sample stride                 (statistics passes' concatenated samples)
                + the tensor's stored inputs, when at most HOLD_BYTES   (held from its statistics to its merge pass)
                + the read-ahead budget (MERGESCOPE_READAHEAD) when inputs come from the Hub
                k = BUFFERS_PER_INPUT[method]: 2 for weighted sums and spherical interpolations, 8 for the
                sparsifying methods (TIES, DARE, DELLA, breadcrumbs) and any method not listed; with the fused
                CPU kernels (merging/native) k = 0 and FUSED_BUFFERS replaces FIXED_BUFFERS
    disk      = Σ output tensors (headers included) + side files + SIDE_FILE_MARGIN

and compares them with what is free: ``MemAvailable`` of /proc/meminfo, or the cgroup's limit minus its working
set when that is lower (a container), and ``shutil.disk_usage`` of the output's nearest existing folder.

The constants are calibrated on measured peaks (tests/test_resources.py measures the peak RSS of real merges
and checks measured ≤ estimate ≤ 4 × measured): with 16 MB bands and 6 inputs, on the torch path, TIES peaked at
0.91-0.98 GB (estimate 1.33 GB), EMR at 0.82 GB (1.22 GB), DELLA at 0.63 GB (1.23 GB), task arithmetic at 0.33 GB
(0.62 GB); with the fused kernels, 3 inputs of 48 MB: task arithmetic 0.14 GB (0.39 GB), TIES 0.20 GB (0.49 GB).
The estimate is for the host; on CUDA part of the float32 working set lives on the GPU instead, so it errs on the
careful side. TIES' rarely needed exact fall-back pass (a bracket missed) holds every model's magnitudes of one
whole tensor and is not counted.

Overrides (bytes, or sizes like ``2GB``) for tests and for simulating a small machine:
``MERGESCOPE_MEMORY_LIMIT`` and ``MERGESCOPE_DISK_LIMIT`` replace the measured free memory / disk;
``MERGESCOPE_RESOURCE_CHECK=0`` turns the check off (the estimate is an upper bound and may be too careful).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import native
from .bands import HOLD_BYTES, is_elementwise, unit_elements
from .errors import MergeError
from .safetensors_io import dtype_size
from .sources.readahead import window_bytes
from .writer import parse_size

# float32 buffers per input, by method (measured, see below): plain weighted sums need the input's converted copy
# and one temporary; sparsifying methods also hold task vectors, magnitudes, masks and trimmed copies per model.
# A method not listed counts as sparsifying: too careful rather than killed.
BUFFERS_PER_INPUT = {"linear": 2, "task_arithmetic": 2, "slerp": 2, "nuslerp": 2, "model_stock": 2,
                     "passthrough": 0}
SPARSIFY_BUFFERS = 8
FIXED_BUFFERS = 6  # float32 buffers independent of the inputs: result, sums, sign votes
# With the fused kernels (merging/native) a band is read as stored and written as output: no float32 copies, but
# the statistics passes still convert their strided samples and the count pass collects its candidates.
FUSED_BUFFERS = 2
# Thread pools and torch's first-use buffers (~64 MB), plus the freed heap glibc may keep for reuse: up to 64 MB in
# each of the engine's two malloc arenas (merging.memory.reuse_freed_memory).
PROCESS_OVERHEAD = (64 + 2 * 64) * 1024 * 1024
SIDE_FILE_MARGIN = 4 * 1024 * 1024  # config.json, tokenizer files, README.md, merge_config.yml, index
MEMORY_ENV = "MERGESCOPE_MEMORY_LIMIT"
DISK_ENV = "MERGESCOPE_DISK_LIMIT"
SWITCH_ENV = "MERGESCOPE_RESOURCE_CHECK"


@dataclass(frozen=True)
class ResourceEstimate:
    """What a merge needs (bytes): peak extra memory of the process and disk for the output folder."""

    memory: int
    disk: int
    largest_task: str  # the tensor whose unit sets the memory peak


@dataclass(frozen=True)
class FreeResources:
    memory: int | None  # None: unknown (not Linux): not checked
    disk: int | None
    memory_source: str  # where the figure came from, for the message
    disk_source: str


def estimate_resources(plan, sources: dict | None = None, fused: bool | None = None) -> ResourceEstimate:
    """Peak memory and output disk of ``plan`` (a merging.plan.MergePlan), from shapes and dtypes only.

    ``sources`` (the opened inputs, by reference) give each input's stored dtype; without them inputs count as
    float32, an upper bound. ``fused``: whether the method runs in the fused CPU kernels (merging/native), which
    hold no float32 copies; None: whenever the method has them and they build here.
    """
    if fused is None:
        fused = uses_kernels(plan.method)
    specs = {ref: src.specs() for ref, src in (sources or {}).items()}

    method = plan.method
    elementwise = is_elementwise(plan)
    per_input = BUFFERS_PER_INPUT.get(method.name, SPARSIFY_BUFFERS)
    fixed = FIXED_BUFFERS
    if fused:
        per_input, fixed = 0, FUSED_BUFFERS
    peak, largest = 0, ""
    for task in plan.tasks:
        spec = task.spec
        numel = spec.numel
        unit = unit_elements(task, elementwise)
        refs = ([task.base] if task.base else []) + list(task.inputs)
        need = 2 * sum(unit * _stored_itemsize(specs, r) for r in refs) + 3 * unit * dtype_size(spec.dtype)
        if not task.copy:
            passes = [p for p in method.stats if p.needed is None or p.needed(task.params)]
            need += 4 * unit * (per_input * len(refs) + fixed)
            strides = [p.sample_stride for p in passes if p.concat]
            if strides:
                need += 4 * numel * len(refs) // min(strides)
            stored = sum(numel * _stored_itemsize(specs, r) for r in refs)
            if passes and stored <= HOLD_BYTES:  # held from the first statistics pass to the merge pass
                need += stored
        if need > peak:
            peak, largest = need, task.name
    return ResourceEstimate(PROCESS_OVERHEAD + peak + readahead_bytes(plan, sources),
                            _output_bytes(plan) + SIDE_FILE_MARGIN, largest)


def readahead_bytes(plan, sources: dict | None) -> int:
    """What the read-ahead may hold on top (``merging.reads``): its budget when a source reads over a network
    (the Hub), at most every input's stored bytes; nothing extra from local disks (one unit ahead, counted above)."""
    remote = [ref for ref, src in (sources or {}).items() if getattr(src, "read_concurrency", 1) > 1]
    if not remote:
        return 0
    specs = {ref: sources[ref].specs() for ref in remote}
    stored = sum(specs[r.model][r.name].nbytes for task in plan.tasks
                 for r in ([task.base] if task.base else []) + list(task.inputs)
                 if r.model in specs and r.name in specs[r.model])
    return min(window_bytes(), stored)


def uses_kernels(method, device: str = "cpu") -> bool:
    """Whether ``method`` runs in the fused CPU kernels on ``device`` (they exist and build on this machine)."""
    return device == "cpu" and method.native is not None and native.library() is not None


def _stored_itemsize(specs: dict, ref) -> int:
    """Bytes per element of an input as stored (a bf16 input takes half the memory of an f32 one); 4 if unknown."""
    spec = specs.get(ref.model, {}).get(ref.name)
    return spec.nbytes // spec.numel if spec is not None and spec.numel else 4


def _output_bytes(plan) -> int:
    """Bytes of every output tensor, with EMR-style methods' extra outputs, plus a header's worth per tensor."""
    total = count = 0
    for task in plan.tasks:
        outputs = plan.method.outputs(task) if plan.method.outputs is not None and not task.copy \
            else [(task.name, task.spec)]
        for _, spec in outputs:
            total += spec.nbytes
            count += 1
    return total + 128 * count


def free_resources(out_dir: str | os.PathLike) -> FreeResources:
    """Free memory (MemAvailable, or the cgroup's headroom when lower) and free disk where ``out_dir`` will be."""
    memory, memory_source = free_memory()
    disk, disk_source = _env_bytes(DISK_ENV), f"${DISK_ENV}"
    if disk is None:
        folder = _existing_ancestor(Path(out_dir).absolute())
        try:
            disk, disk_source = shutil.disk_usage(folder).free, f"free on {folder}"
        except OSError:
            disk, disk_source = None, "unknown"
    return FreeResources(memory, disk, memory_source, disk_source)


def free_memory() -> tuple[int | None, str]:
    """Free memory (bytes, or None when unknown) and where the figure came from: $MERGESCOPE_MEMORY_LIMIT, else
    MemAvailable, lowered to the cgroup's headroom when that is smaller."""
    memory = _env_bytes(MEMORY_ENV)
    return (memory, f"${MEMORY_ENV}") if memory is not None else _available_memory()


def checks_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def require_memory(need: int, what: str, available: int | None = None, source: str = "") -> None:
    """Raise MergeError with the figures when ``need`` bytes exceed the free memory (``available``, or the host's).

    The same rule and message as a merge's pre-flight, for other jobs (``merging.evaluate``): ``what`` names the
    job and what sets its peak."""
    if not checks_enabled():
        return
    if available is None:
        available, source = free_memory()
    if available is not None and need > available:
        raise MergeError(f"not enough memory: {what} needs about {_gb(need)} but only {_gb(available)} is "
                         f"available ({source}); use a bigger machine, or set {SWITCH_ENV}=0 to try anyway")


def check_memory(plan, sources: dict | None, what: str, fused: bool | None = None) -> ResourceEstimate:
    """Raise MergeError with the figures when a pass over ``plan`` (an analysis: the merge's units, nothing written)
    cannot fit in free memory."""
    estimate = estimate_resources(plan, sources, fused)
    require_memory(estimate.memory, f"{what} (peak at {estimate.largest_task})")
    return estimate


def check_resources(plan, out_dir: str | os.PathLike, sources: dict | None = None,
                    fused: bool | None = None) -> ResourceEstimate:
    """Raise MergeError with the figures when the merge's estimated memory or disk exceeds what is free."""
    estimate = estimate_resources(plan, sources, fused)
    if not checks_enabled():
        return estimate
    free = free_resources(out_dir)
    if free.memory is not None and estimate.memory > free.memory:
        raise MergeError(f"not enough memory: this merge needs about {_gb(estimate.memory)} (peak at "
                         f"{estimate.largest_task}) but only {_gb(free.memory)} is available ({free.memory_source}); "
                         f"merge on a bigger machine, or set {SWITCH_ENV}=0 to try anyway")
    if free.disk is not None and estimate.disk > free.disk:
        raise MergeError(f"not enough disk space for {Path(out_dir)}: the output needs about {_gb(estimate.disk)} "
                         f"but only {_gb(free.disk)} is free ({free.disk_source})")
    return estimate


def _available_memory() -> tuple[int | None, str]:
    """MemAvailable of /proc/meminfo, lowered to the cgroup's limit minus its working set when that is smaller."""
    best, source = None, "unknown"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best, source = int(line.split()[1]) * 1024, "MemAvailable"
                    break
    except (OSError, ValueError, IndexError):
        pass
    headroom = _cgroup_headroom()
    if headroom is not None and (best is None or headroom < best):
        best, source = headroom, "the container's memory limit"
    return best, source


def _cgroup_headroom() -> int | None:
    """limit − (usage − inactive file cache) of this process's memory cgroup (v2, then v1); None if unlimited."""
    for limit_file, usage_file, stat_file, inactive_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit = int(raw)
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # "no limit" in cgroup v1 is a page-rounded 2^63
            return None
        inactive = 0
        try:
            for line in Path(stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
                    break
        except (OSError, ValueError):
            pass
        return max(0, limit - max(0, usage - inactive))
    return None


def _env_bytes(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw) if raw.isdigit() else parse_size(raw)
    except MergeError:
        raise MergeError(f"${name}={raw!r} is not a size in bytes (like 2000000000 or 2GB)") from None
    return value


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{math.ceil(n / 1e6)} MB"
