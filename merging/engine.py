"""Streaming execution of a merge plan, tensor by tensor.

Per output tensor: read its inputs (read ahead while earlier ones are computed: the next unit from a local disk,
every input of several upcoming units within a byte budget from the Hub, ``merging.sources.readahead``), convert to
float32 on the chosen device, call the method, convert to the output dtype and hand it to the writer (which writes
on a third thread, in order). Peak memory is about (inputs × largest tensor) plus the float32 working copies of one
tensor and the read-ahead budget; no shard is ever buffered. Methods with a reduction get a streaming first pass.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import native
from .bands import HOLD_BYTES, Band, is_elementwise, row_bands
from .budget import with_budget
from .config import SAFETENSORS_DTYPE, MergeConfig
from .errors import Cancelled, MergeError
from .memory import RetainedMemory, reuse_freed_memory
from .methods.registry import REDUCED, TensorContext
from .nonfinite import NonFinite
from .plan import MergePlan, TensorTask, build_plan, layer_index
from .reads import UnitReads
from .resources import check_resources, uses_kernels
from .safetensors_io import DTYPES
from .sources import CheckpointSource, open_sources
from .sources.base import TensorSpec
from .whole_model import gather_stats, model_statistics
from .writer import NON_MODEL_STEM, OutputFolder, ShardedWriter, parse_size, write_side_files


@dataclass(frozen=True)
class Progress:
    phase: str  # "reduce" or "merge"
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0

    @property
    def eta_s(self) -> float | None:
        return self.elapsed_s * (1 - self.fraction) / self.fraction if self.fraction > 0 else None


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    files: list[str]
    tensors: int
    bytes_written: int
    seconds: float
    device: str
    notes: list[str]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available on this machine")
    if device not in ("cpu", "cuda"):
        raise MergeError(f"--device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


class Executor(UnitReads):
    """Runs a plan's tensor tasks over opened sources; shared by merging and analysis (reads: ``UnitReads``)."""

    def __init__(self, plan: MergePlan, sources: dict[str, CheckpointSource], device: torch.device,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> None:
        super().__init__(sources)
        self.plan = plan
        self.device = device
        self.progress = progress
        self.cancel = cancel or (lambda: False)
        self.memory = RetainedMemory()
        name = plan.config.dtype
        self._load_dtype = DTYPES[SAFETENSORS_DTYPE[name]] if name else None
        self.model_stats = None  # the method's whole-model statistics (merging.whole_model), once gathered

    def bands(self, task: TensorTask, elementwise: bool) -> list[Band]:
        return row_bands(task, elementwise)

    def is_elementwise(self) -> bool:
        return is_elementwise(self.plan)

    def tensor_stats(self, task: TensorTask, reduced: torch.Tensor | None, passes=None, params: dict | None = None,
                     first=None):
        """Run statistics passes (default: the method's) over one tensor's bands (read again: the page cache serves
        them); ``params`` replaces the task's parameters for them. ``first``: (band, (base, models)), a band the
        caller already holds (the merge pass's current one), used instead of reading it again."""
        bands = self.bands(task, self.is_elementwise())
        params = task.params if params is None else params
        if first is None or (task.name, first[0]) not in self._held:
            self._held.clear()  # what an earlier tensor's merge pass did not take
        if first is not None:
            self._held[(task.name, first[0])] = first[1]
        hold = sum(self.sources[r.model].specs()[r.name].nbytes
                   for r in ([task.base] if task.base else []) + list(task.inputs)) <= HOLD_BYTES

        return gather_stats(self.plan.method.stats if passes is None else passes, params,
                            lambda: self.prefetched(task, bands, hold),
                            lambda band, stats: self.context(task, band, reduced, stats),
                            lambda base, models, stride: self.stats_inputs(task, base, models, stride),
                            lambda stats_pass, base, models, ctx: self.native_stats(stats_pass, task, base, models,
                                                                                    ctx, params))

    def prefetched(self, task: TensorTask, bands: list[Band], hold: bool):
        """(band, (base, models)) of each band for a statistics pass, the next ones read ahead (on the running
        pass's read-ahead, so a band it already asked for is not read again)."""
        with self.reading():
            for i, band in enumerate(bands):
                inputs = self.held_inputs(task, band, hold)
                self.memory.check()
                self._ahead.top_up(self._upcoming([(task, b) for b in bands[i + 1:]]))
                yield band, inputs

    def stats_inputs(self, task: TensorTask, base, models, stride: int):
        """What a statistics pass's ``collect`` sees of one band: float32, every ``stride``-th element."""
        rows = task.shared_rows
        if stride > 1:  # subsample before converting: a sampling pass costs a fraction of a merge
            base = base[:rows].reshape(-1)[::stride] if base is not None else None
            models = [m[:rows].reshape(-1)[::stride] for m in models]
            rows = None
        return (self.to_compute(base, rows) if base is not None else None), [self.to_compute(m, rows) for m in models]

    def native_ready(self, task: TensorTask, base, models, out_dtype=None) -> bool:
        """Whether this unit can go to the fused CPU kernels (merging/native) with its inputs as stored."""
        return task.shared_rows is None and native.usable(self.device, base, *models, out_dtype=out_dtype)

    def native_stats(self, stats_pass, task: TensorTask, base, models, ctx: TensorContext, params: dict):
        if stats_pass.native is None or not self.native_ready(task, base, models):
            return None
        return stats_pass.native(base, models, params, ctx)

    def context(self, task: TensorTask, band, reduced, stats) -> TensorContext:
        return TensorContext(task.name, self.plan.config.seed, reduced, task.model_names, band=band,
                             shape=task.spec.shape, stats=stats, model_stats=self.model_stats,
                             layer=layer_index(task.name), num_layers=self.plan.num_layers)

    def units(self, tasks: list[TensorTask]) -> list[tuple[TensorTask, tuple[int, int] | None]]:
        """Split the work: row bands of about BAND_ELEMENTS for element-wise methods and copies, else whole tensors.

        Bands keep every buffer small and reused, so a 65M-element embedding costs no more memory than a
        layer norm, and reading, computing and writing overlap at a fine grain.
        """
        elementwise = self.is_elementwise()
        return [(task, band) for task in tasks for band in self.bands(task, elementwise)]

    def read_input(self, task: TensorTask, ref, band: Band) -> torch.Tensor:
        return self.as_loaded(super().read_input(task, ref, band))

    def as_loaded(self, tensor: torch.Tensor) -> torch.Tensor:
        """A float input in the config's ``dtype``, as mergekit loads every input before merging (so a float32
        checkpoint merged with ``dtype: bfloat16`` is rounded to bfloat16 first, then merged in float32)."""
        dtype = self._load_dtype
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor

    def to_compute(self, tensor: torch.Tensor, rows: int | None) -> torch.Tensor:
        if rows is not None:
            tensor = tensor[:rows]
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(torch.float32)

    def stream(self, tasks: list[TensorTask], phase: str, banded: bool = False):
        """Yield (task, band, base, models), inputs prefetched one unit ahead; checks cancel between units.

        ``band`` is None for a whole tensor, else the (start, stop) rows this unit covers.
        """
        units = self.units(tasks) if banded else [(t, None) for t in tasks]
        total_bytes = sum(t.spec.nbytes for t in tasks) or 1
        done_bytes = done_tensors = 0
        start = time.monotonic()
        with self.reading() as ahead:
            for i, (task, band) in enumerate(units):
                if self.cancel():
                    raise Cancelled("merge cancelled; nothing was written")
                ahead.top_up(self._upcoming(units[i:i + 1]))  # this unit's reads first, at once
                base, models = self.unit_inputs(task, band)
                self.memory.check()
                ahead.top_up(self._upcoming(units[j] for j in range(i + 1, len(units))))
                yield task, band, base, models
                last = band is None or band[1] == task.spec.shape[0]
                rows = task.spec.shape[0] if band is not None else 1
                done_bytes += task.spec.nbytes if band is None else task.spec.nbytes * (band[1] - band[0]) // rows
                done_tensors += last
                if self.progress and last:
                    elapsed = time.monotonic() - start
                    self.progress(Progress(phase, done_tensors, len(tasks), done_bytes, total_bytes, elapsed))
        if self.cancel():
            raise Cancelled("merge cancelled; nothing was written")

    def compute(self, task: TensorTask, base: torch.Tensor | None, models: list[torch.Tensor],
                reduced: torch.Tensor | None = None, reducing: bool = False, band: tuple[int, int] | None = None,
                stats=None):
        method = self.plan.method
        if reducing and method.native_reduce is not None and self.native_ready(task, base, models):
            result = method.native_reduce(base, models, task.params, self.context(task, band, reduced, stats))
            if result is not None:
                return result
        rows = task.shared_rows
        b = self.to_compute(base, rows) if base is not None else None
        ms = [self.to_compute(m, rows) for m in models]
        ctx = self.context(task, band, reduced, stats)
        fn = self.plan.method.reduce if reducing else self.plan.method.fn
        return fn(b, ms, task.params, ctx)

    def merge(self, task: TensorTask, base: torch.Tensor | None, models: list[torch.Tensor],
              reduced: torch.Tensor | None, band: tuple[int, int] | None, stats) -> tuple[object, int | None]:
        """One unit's result, in the output dtype (a tensor, or a dict of outputs for methods like EMR), and its
        count of NaN/Inf values when the kernel counted them (None: not counted)."""
        done = self.try_native(task, base, models, self.context(task, band, reduced, stats))
        if done is not None:
            return done
        result = self.compute(task, base, models, reduced, band=band, stats=stats)
        if isinstance(result, dict):
            return result, None
        return self.finish_tensor(task, result, base), None

    def try_native(self, task: TensorTask, base, models, ctx: TensorContext) -> tuple[object, int | None] | None:
        """The method's fused kernel on the inputs as stored, in the output dtype (see ``merge``); None when the
        method has none, the inputs do not suit it, or it declines this tensor."""
        method, out_dtype = self.plan.method, DTYPES[task.spec.dtype]
        if method.native is None or not self.native_ready(task, base, models, out_dtype):
            return None
        return method.native(base, models, task.params, ctx, out_dtype)

    def finish_tensor(self, task: TensorTask, result: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        out = result.to(DTYPES[task.spec.dtype])
        if task.shared_rows is not None and task.shared_rows < task.spec.shape[0]:
            rest = base[task.shared_rows:].to(self.device, DTYPES[task.spec.dtype])
            out = torch.cat([out, rest])
        return out.cpu()

    def wants_reduction(self) -> bool:
        """Whether the plan needs the method's whole-model totals (the hook also validates the plan, e.g. EMR's)."""
        method = self.plan.method
        return method.reduce is not None and (method.reduce_needed is None or bool(method.reduce_needed(self.plan)))

    def reduction_share(self, task: TensorTask, band, base, models, result) -> torch.Tensor:
        """One merged unit's share of the totals, for methods that gather them during the merge pass: the result's
        REDUCED entry when the method computed it, else ``reduce`` on the same inputs."""
        part = result.pop(REDUCED, None) if isinstance(result, dict) else None
        if part is None:
            part = self.compute(task, base, models, reducing=True, band=band)
        return part.to(torch.float64)

    def reduction(self) -> torch.Tensor | None:
        """The method's whole-model totals: a streaming first pass summing per-tensor 1-D results."""
        if not self.wants_reduction():
            return None
        merge_tasks = [t for t in self.plan.tasks if not t.copy]
        total = stats = None
        wants_stats = self.plan.method.reduce_stats
        for task, band, base, models in self.stream(merge_tasks, "reduce", banded=True):
            if band is None or band[0] == 0:  # a tensor starts: its statistics, if its reduction needs the merge
                stats = None
                if wants_stats is not None and wants_stats(task.params):
                    stats = self.tensor_stats(task, None, first=(band, (base, models)))
            part = self.compute(task, base, models, reducing=True, band=band, stats=stats).to(torch.float64)
            total = part if total is None else total + part
        return total


def run_merge(config: MergeConfig, out_dir: str | Path, *, device: str = "auto", max_shard_size: str | int = "5GB",
              allow_pickle: bool = False, overwrite: bool = False, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, resolver=None, time_budget: float | None = None,
              disk_check: Callable[[int], None] | None = None) -> MergeResult:
    """Merge as ``config`` says into ``out_dir``; the folder appears only when everything succeeded; past
    ``time_budget`` seconds (``merging.budget``) it stops as a cancel does. ``disk_check``: the caller's own check of
    the output's estimated bytes (a quota, a zip), with the pre-flight."""
    started, cancel = time.monotonic(), with_budget(cancel, time_budget, "the merge")
    reuse_freed_memory()
    # The merge loop allocates small objects by the thousand; without this, the collections they trigger rescan
    # every object torch and the app ever made (seconds over a merge). Objects alive now are long-lived anyway.
    gc.freeze()
    dev = pick_device(device)
    shard_bytes = parse_size(max_shard_size)
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        plan = build_plan(config, sources)
        plan.require_compatible()
        # refuse up front rather than die of OOM or a full disk
        estimate = check_resources(plan, out_dir, sources, uses_kernels(plan.method, dev.type))
        if disk_check is not None:
            disk_check(estimate.disk)
        executor = Executor(plan, sources, dev, progress, cancel)
        with native.own_cores(uses_kernels(plan.method, dev.type)), OutputFolder(out_dir, overwrite) as tmp:
            model_statistics(executor)
            after_merge = plan.method.reduce_after_merge and executor.wants_reduction()
            reduced = None if after_merge else executor.reduction()
            outputs = _planned_outputs(plan)
            planned = dict(outputs)
            writer = ShardedWriter(tmp, outputs, shard_bytes,
                                   stem="model" if plan.method.model_output else NON_MODEL_STEM)
            stats = totals = None
            nonfinite = NonFinite(config.refuse_nonfinite, plan.method.name)
            try:
                for task, band, base, models in executor.stream(plan.tasks, "merge", banded=True):
                    first_row = band[0] if band else 0
                    if task.copy:
                        writer.write_async(task.name, base.to(DTYPES[task.spec.dtype]), first_row)
                        continue
                    if plan.method.stats and (band is None or band[0] == 0):
                        stats = executor.tensor_stats(task, reduced, first=(band, (base, models)))
                    nonfinite.check_inputs(task, base, models)
                    result, bad = executor.merge(task, base, models, reduced, band, stats)
                    if after_merge:
                        share = executor.reduction_share(task, band, base, models, result)
                        totals = share if totals is None else totals + share
                    if isinstance(result, dict):  # several outputs per input tensor (EMR), each in its planned dtype
                        for name, tensor in result.items():
                            spec = planned[name]
                            writer.write_async(name, tensor.to(DTYPES[spec.dtype]).cpu(),
                                               _output_first_row(spec, task, first_row))
                    else:
                        nonfinite.check_merged(result, task.name, bad)
                        writer.write_async(task.name, result, first_row)
                writer.finish()
            finally:
                writer.close()
            plan.report.notes.extend(nonfinite.notes())
            # tokenizer files, config, model card: a full disk here is one line too (OutputFolder says it)
            write_side_files(tmp, plan, sources, totals if after_merge else reduced)
            files = sorted(p.name for p in tmp.iterdir())
        return MergeResult(Path(out_dir).absolute(), files, len(plan.tasks), writer.total_size,
                           time.monotonic() - started, str(dev), plan.report.notes)
    finally:
        for src in sources.values():
            src.close()


def _output_first_row(spec: TensorSpec, task: TensorTask, first_row: int) -> int:
    """Where a band's share of one of a method's extra outputs starts: the same row for outputs shaped like the
    tensor; for a 1-D packed bit mask (one bit per element), the byte of the band's first element."""
    if first_row == 0 or spec.shape == task.spec.shape:
        return first_row
    if spec.dtype == "U8" and len(spec.shape) == 1 and spec.shape[0] == (task.spec.numel + 7) // 8:
        element = first_row * (task.spec.numel // task.spec.shape[0])
        assert element % 8 == 0, "bands start on whole bytes of a packed mask"
        return element // 8
    raise AssertionError(f"{task.name}: output {spec} cannot be written band by band")


def _planned_outputs(plan: MergePlan):
    outputs = []
    for task in plan.tasks:
        if plan.method.outputs is not None and not task.copy:
            outputs += plan.method.outputs(task)
        else:
            outputs.append((task.name, task.spec))
    return outputs


def plan_merge(config: MergeConfig, *, allow_pickle: bool = False, resolver=None) -> MergePlan:
    """Open the inputs, plan, and return the plan (its report says whether a merge would run)."""
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        return build_plan(config, sources)
    finally:
        for src in sources.values():
            src.close()


