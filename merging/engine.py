"""Streaming execution of a merge plan, tensor by tensor.

Per output tensor: read its inputs (the next tensor's inputs are read on a second thread while this one is
computed), convert to float32 on the chosen device, call the method, convert to the output dtype and hand it to the
writer (which writes on a third thread). Peak memory is about (inputs × largest tensor) plus the float32 working
copies of one tensor; no shard is ever buffered. Methods with a reduction get a streaming first pass.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import MergeConfig
from .errors import Cancelled, MergeError
from .methods.registry import TensorContext
from .plan import MergePlan, TensorTask, build_plan
from .safetensors_io import DTYPES
from .sources import CheckpointSource, open_sources
from .writer import OutputFolder, ShardedWriter, model_card, parse_size


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


class Executor:
    """Runs a plan's tensor tasks over opened sources; shared by merging and analysis."""

    def __init__(self, plan: MergePlan, sources: dict[str, CheckpointSource], device: torch.device,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> None:
        self.plan = plan
        self.sources = sources
        self.device = device
        self.progress = progress
        self.cancel = cancel or (lambda: False)

    def read_inputs(self, task: TensorTask) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The task's tensors as stored (on the CPU)."""
        base = self.sources[task.base.model].read(task.base.name) if task.base else None
        models = [self.sources[r.model].read(r.name) for r in task.inputs]
        return base, models

    def to_compute(self, tensor: torch.Tensor, rows: int | None) -> torch.Tensor:
        if rows is not None:
            tensor = tensor[:rows]
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(torch.float32)

    def stream(self, tasks: list[TensorTask], phase: str):
        """Yield (task, base, models) with inputs prefetched one task ahead; checks cancel between tensors."""
        total_bytes = sum(t.spec.nbytes for t in tasks) or 1
        done_bytes = 0
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(self.read_inputs, tasks[0]) if tasks else None
            for i, task in enumerate(tasks):
                if self.cancel():
                    pending.cancel()
                    raise Cancelled("merge cancelled; nothing was written")
                base, models = pending.result()
                pending = pool.submit(self.read_inputs, tasks[i + 1]) if i + 1 < len(tasks) else None
                yield task, base, models
                done_bytes += task.spec.nbytes
                if self.progress:
                    self.progress(Progress(phase, i + 1, len(tasks), done_bytes, total_bytes, time.monotonic() - start))
        if self.cancel():
            raise Cancelled("merge cancelled; nothing was written")

    def compute(self, task: TensorTask, base: torch.Tensor | None, models: list[torch.Tensor],
                reduced: torch.Tensor | None = None, reducing: bool = False):
        rows = task.shared_rows
        b = self.to_compute(base, rows) if base is not None else None
        ms = [self.to_compute(m, rows) for m in models]
        ctx = TensorContext(task.name, self.plan.config.seed, reduced, task.model_names)
        fn = self.plan.method.reduce if reducing else self.plan.method.fn
        return fn(b, ms, task.params, ctx)

    def finish_tensor(self, task: TensorTask, result: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        out = result.to(DTYPES[task.spec.dtype])
        if task.shared_rows is not None and task.shared_rows < task.spec.shape[0]:
            rest = base[task.shared_rows:].to(self.device, DTYPES[task.spec.dtype])
            out = torch.cat([out, rest])
        return out.cpu()

    def reduction(self) -> torch.Tensor | None:
        """The method's whole-model totals: a streaming first pass summing per-tensor 1-D results."""
        if self.plan.method.reduce is None:
            return None
        merge_tasks = [t for t in self.plan.tasks if not t.copy]
        total = None
        for task, base, models in self.stream(merge_tasks, "reduce"):
            part = self.compute(task, base, models, reducing=True).to(torch.float64)
            total = part if total is None else total + part
        return total


def run_merge(config: MergeConfig, out_dir: str | Path, *, device: str = "auto", max_shard_size: str | int = "5GB",
              allow_pickle: bool = False, overwrite: bool = False, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, resolver=None) -> MergeResult:
    """Merge as ``config`` says into ``out_dir``; the folder appears only when everything succeeded."""
    started = time.monotonic()
    dev = pick_device(device)
    shard_bytes = parse_size(max_shard_size)
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        plan = build_plan(config, sources)
        plan.require_compatible()
        executor = Executor(plan, sources, dev, progress, cancel)
        with OutputFolder(out_dir, overwrite) as tmp:
            reduced = executor.reduction()
            outputs = _planned_outputs(plan)
            writer = ShardedWriter(tmp, outputs, shard_bytes)
            try:
                for task, base, models in executor.stream(plan.tasks, "merge"):
                    if task.copy:
                        writer.write_async(task.name, base.to(DTYPES[task.spec.dtype]))
                        continue
                    result = executor.compute(task, base, models, reduced)
                    if isinstance(result, dict):
                        for name, tensor in result.items():
                            writer.write_async(name, tensor.cpu())
                    else:
                        writer.write_async(task.name, executor.finish_tensor(task, result, base))
                writer.finish()
            finally:
                writer.close()
            _write_side_files(tmp, plan, sources, reduced)
            files = sorted(p.name for p in tmp.iterdir())
        return MergeResult(Path(out_dir).absolute(), files, len(plan.tasks), writer.total_size,
                           time.monotonic() - started, str(dev), plan.report.notes)
    finally:
        for src in sources.values():
            src.close()


def _planned_outputs(plan: MergePlan):
    outputs = []
    for task in plan.tasks:
        if plan.method.outputs is not None and not task.copy:
            outputs += plan.method.outputs(task)
        else:
            outputs.append((task.name, task.spec))
    return outputs


def _write_side_files(folder: Path, plan: MergePlan, sources: dict[str, CheckpointSource], reduced) -> None:
    import json

    ref = sources[plan.reference]
    for name in ref.file_names():
        if name == "config.json" and plan.out_config is not None:
            continue
        data = ref.read_file(name)
        if data is not None:
            (folder / name).write_bytes(data)
    if plan.out_config is not None:
        out_cfg = dict(plan.out_config)
        if plan.config.output_dtype:
            out_cfg["torch_dtype"] = plan.config.out_dtype or plan.config.dtype
        (folder / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
    config_yaml = plan.config.to_yaml()
    (folder / "merge_config.yml").write_text(config_yaml)
    if plan.method.finalize is not None:
        for name, data in plan.method.finalize(plan, reduced).items():
            (folder / name).write_bytes(data)
    (folder / "README.md").write_text(model_card(config_yaml, plan.method.name, plan.method.summary, plan.method.paper,
                                                 plan.config.model_refs(), plan.report.notes))


def plan_merge(config: MergeConfig, *, allow_pickle: bool = False, resolver=None) -> MergePlan:
    """Open the inputs, plan, and return the plan (its report says whether a merge would run)."""
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        return build_plan(config, sources)
    finally:
        for src in sources.values():
            src.close()


