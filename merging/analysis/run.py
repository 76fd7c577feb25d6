"""The analysis pass: the plan's tensors streamed unit by unit through the engine's executor, into sums, into JSON."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import native
from ..budget import with_budget
from ..config import MergeConfig
from ..engine import pick_device
from ..errors import ConfigError
from ..memory import reuse_freed_memory
from ..methods.registry import TensorContext
from ..nonfinite import NonFinite
from ..plan import MergePlan, TensorTask, build_plan
from ..resources import check_memory
from ..safetensors_io import DTYPES
from ..sources import CheckpointSource, open_sources
from ..whole_model import model_statistics
from .figures import StatsContext, figures, finite_list, model_labels
from .reader import (
    DEFAULT_SAMPLE_FRACTION,
    SAMPLE_THRESHOLD_BYTES,
    WHOLE_TENSOR_BYTES,
    AnalysisExecutor,
    sampled_rows,
    tensor_rows,
)
from .schema import SCHEMA_VERSION
from .spectral import SAMPLED_SPECTRAL_ELEMENTS, SPECTRAL_ELEMENTS, attach, spectral_choice, tensor_spectrum
from .sums import TensorSums, tensor_sums
from .trim import DEFAULT_TRIM_DENSITY, Trim, tensor_cuts, trim_densities, trims_by_config

INTERVAL = ("95% Taylor-linearized ratio-estimator interval; runs of consecutive rows are clusters, tensors strata, "
            "finite-population corrected")


@dataclass(frozen=True)
class Request:
    """What ``analyze`` was asked for, besides the config."""

    exact: bool = False
    sample: float | None = None
    seed: int = 0
    device: str = "cpu"
    progress: Callable | None = None
    cancel: Callable[[], bool] | None = None
    sample_threshold_bytes: int = SAMPLE_THRESHOLD_BYTES
    whole_tensor_bytes: int = WHOLE_TENSOR_BYTES
    spectral_elements: int | None = None  # None: SPECTRAL_ELEMENTS, or SAMPLED_SPECTRAL_ELEMENTS when sampled

    def fraction(self, bytes_total: int) -> float:
        """The fraction of rows read: 1 for an exact pass."""
        if self.exact:
            return 1.0
        if self.sample is not None:
            return float(self.sample)
        return DEFAULT_SAMPLE_FRACTION if bytes_total > self.sample_threshold_bytes else 1.0


def analyze(config: MergeConfig, *, exact: bool = False, sample: float | None = None, seed: int = 0,
            device: str = "cpu", progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
            resolver=None, allow_pickle: bool = False, sample_threshold_bytes: int = SAMPLE_THRESHOLD_BYTES,
            whole_tensor_bytes: int = WHOLE_TENSOR_BYTES, time_budget: float | None = None,
            spectral_elements: int | None = None) -> dict[str, Any]:
    """The diagnostics of ``config`` as a JSON-ready dict (schema: ``JSON_SCHEMA_DOC``).

    ``exact`` forces a full pass; ``sample`` (0 < fraction ≤ 1) samples that fraction of rows; neither: exact up to
    ``sample_threshold_bytes`` of input, sampled at ``DEFAULT_SAMPLE_FRACTION`` above. Refused up front when its
    peak memory cannot fit (as a merge's pre-flight, ``merging.resources``); past ``time_budget`` seconds
    (``merging.budget``) it stops as a cancel does.
    """
    if exact and sample is not None:
        raise ConfigError("analysis: choose either an exact pass or a sample fraction, not both")
    if sample is not None and not 0 < sample <= 1:
        raise ConfigError(f"analysis: the sample fraction must be in (0, 1], got {sample}")
    cancel = with_budget(cancel, time_budget, "the analysis")
    request = Request(exact, sample, seed, device, progress, cancel, sample_threshold_bytes, whole_tensor_bytes,
                      spectral_elements)
    started = time.monotonic()
    reuse_freed_memory()  # as a merge does: keep freed chunk buffers instead of re-mapping them every tensor
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        return _analyze(config, sources, request, started)
    finally:
        for src in sources.values():
            src.close()


def _analyze(config: MergeConfig, sources: dict[str, CheckpointSource], request: Request,
             started: float) -> dict[str, Any]:
    plan = build_plan(config, sources)
    plan.require_compatible()
    tasks, notes = _analyzed_tasks(plan)
    check_memory(plan, sources, "this analysis")
    bytes_total = sum(sources[r.model].specs()[r.name].nbytes for t in tasks for r in [t.base, *t.inputs])
    fraction = request.fraction(bytes_total)
    rows = sampled_rows(tasks, sources, fraction, request.seed, request.whole_tensor_bytes)
    executor = AnalysisExecutor(plan, sources, pick_device(request.device), request.progress, request.cancel,
                                sampled_rows=rows)
    read_before = _bytes_read(sources)
    model_statistics(executor)  # e.g. TIES' global top-k threshold (`topk_scope: model`), before anything else
    passes = 2 if _needs_reduction(executor) else 1
    nonfinite = NonFinite(False, plan.method.name)
    spectral_budget = request.spectral_elements
    if spectral_budget is None:
        spectral_budget = SPECTRAL_ELEMENTS if fraction == 1 else SAMPLED_SPECTRAL_ELEMENTS
    chosen, spectral_note = spectral_choice(tasks, spectral_budget, None if fraction == 1 else
                                            lambda task: math.prod(executor.read_shape(task)))
    if spectral_note:
        notes.append(spectral_note)
    nonfinite.count_inputs = True  # a statistic over a NaN input is NaN or silently short: always say so
    # the method's merge and the sums in the fused kernels: torch's own ops on one thread (native.own_cores)
    fused = executor.device.type == "cpu" and plan.method.native is not None
    with native.own_cores(fused and native.library() is not None):
        reduced = _reduction(executor, tasks) if passes == 2 else None
        per_tensor, several_outputs, spectra, spectral_seconds = _sum_tensors(executor, tasks, reduced, nonfinite,
                                                                              chosen)
    notes[:0] = [f"{n}: the statistics of that model are not meaningful there" for n in nonfinite.notes()]
    bytes_read = _bytes_read(sources) - read_before
    if several_outputs:
        notes.append(f"{plan.method.name} writes several tensors per input tensor: no merged-distance statistics")
    whole = TensorSums.add([s for _, s in per_tensor])
    sampled = fraction < 1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # NaN/Inf inputs: said in the notes
        ctx = _stats_context(plan, tasks, whole, sampled)
        stats = figures(per_tensor, whole, ctx)
    attach(stats, spectra)
    meta = {
        "mode": "sampled" if sampled else "exact",
        "sample_fraction": fraction if sampled else None,
        "tensors_sampled": len(rows),
        "seed": request.seed,
        "bytes_read": int(bytes_read),
        "bytes_total": int(bytes_total),
        "seconds": round(time.monotonic() - started, 3),
        "spectral_seconds": round(spectral_seconds, 3),
        "passes": passes,
        "device": str(executor.device),
        **_method_meta(plan, tasks, ctx),
        "interval": INTERVAL if sampled else None,
        "sample_threshold_bytes": request.sample_threshold_bytes,
        "whole_tensor_bytes": request.whole_tensor_bytes,
        "notes": notes,
    }
    return {"schema_version": SCHEMA_VERSION, "meta": meta, "config_yaml": config.to_yaml(), **stats}


def _analyzed_tasks(plan: MergePlan) -> tuple[list[TensorTask], list[str]]:
    """The tensors merged from a base and fine-tunes (the others have no task vector), and the plan's notes."""
    if not plan.config.base_model:
        raise ConfigError("config: the analysis compares task vectors τ_i = θ_i − θ_base and needs a `base_model`")
    tasks = [t for t in plan.tasks if not t.copy and t.base is not None and t.inputs]
    notes = list(plan.report.notes)
    skipped = [t.name for t in plan.tasks if not t.copy and (t.base is None or not t.inputs)]
    if skipped:
        notes.append(f"{len(skipped)} tensors have no base or no inputs in their slice and are not analyzed")
    if not tasks:
        raise ConfigError(f"config: nothing to analyze: merge_method {plan.method.name!r} merges no tensor from a "
                          "base and fine-tunes")
    models = list(tasks[0].model_names)
    if any(list(t.model_names) != models for t in tasks):
        raise ConfigError("config: the analysis needs the same models, in the same order, for every tensor "
                          "(slices with different sources are not supported)")
    return tasks, notes


def _bytes_read(sources: dict[str, CheckpointSource]) -> int:
    return sum(src.bytes_read() for src in sources.values())


def _needs_reduction(executor: AnalysisExecutor) -> bool:
    """Whether the method needs its whole-model totals first (asking also validates the plan). A method sharing one
    task vector needs none here: the analysis derives its rescalers from its own sums."""
    return executor.wants_reduction() and executor.plan.method.unified is None


def _reduction(executor: AnalysisExecutor, tasks: list[TensorTask]) -> torch.Tensor:
    """The method's whole-model totals from a first pass over the same rows (sampled ones scaled to the tensor)."""
    total = None
    for task, _, base, inputs in executor.stream(tasks, "reduce"):
        part = executor.compute(task, base, inputs, reducing=True).to(torch.float64).cpu()
        shape = executor.read_shape(task)
        part = part * (tensor_rows(task) / (shape[0] if shape else 1))
        total = part if total is None else total + part
    return total


def _sum_tensors(executor: AnalysisExecutor, tasks: list[TensorTask], reduced: torch.Tensor | None,
                 nonfinite: NonFinite, chosen: set[str] | None = None
                 ) -> tuple[list[tuple[TensorTask, TensorSums]], bool, dict[str, dict | None], float]:
    """Every tensor's sums, unit by unit as the engine streams them, band by band like a merge (whole-tensor
    quantities, the trim's and the method's top-k cuts, a randomized SVD's sketches, come from the statistics
    passes first, so a banded tensor is never held whole); whether the method wrote several tensors per input (then
    no merged distance); each 2-D tensor's spectral diagnostics (``spectral``), and the seconds they took."""
    method = executor.plan.method
    per_tensor: list[tuple[TensorTask, list[TensorSums]]] = []
    spectra: dict[str, dict | None] = {}
    several_outputs = False
    stats = cuts = None
    spectral_seconds = 0.0
    for task, band, base, inputs in executor.stream(tasks, "analyze", banded=True):
        if band is None or band[0] == 0:  # a tensor starts
            per_tensor.append((task, []))
            first = (band, (base, inputs))  # the unit in hand: the passes need not read it again
            stats = executor.tensor_stats(task, reduced, first=first) if method.stats else None
            densities = trim_densities(method, task.params, len(inputs))
            cuts = tensor_cuts(executor, task, reduced, densities, stats, first)
            spectral_started = time.monotonic()
            spectra[task.name] = tensor_spectrum(executor, task, reduced, band, base, inputs,
                                                 executor.plan.config.seed, chosen)
            spectral_seconds += time.monotonic() - spectral_started
        nonfinite.check_inputs(task, base, inputs)
        ctx = executor.context(task, band, reduced, stats)
        sums, several = _unit_sums(executor, task, band, base, inputs, ctx, Trim(cuts, ctx))
        several_outputs |= several
        per_tensor[-1][1].append(sums)
    return [(task, TensorSums.add(units)) for task, units in per_tensor], several_outputs, spectra, spectral_seconds


def _unit_sums(executor: AnalysisExecutor, task: TensorTask, band, base, inputs, ctx: TensorContext,
               trim: Trim) -> tuple[TensorSums, bool]:
    """One unit's sums, with what the method makes of it; and whether it wrote several tensors for it."""
    method = executor.plan.method
    shares_unified = method.unified is not None
    per_task = method.skipped is not None and method.skipped(task.name, task.params)
    own_elected = shares_unified and method.elects and not per_task  # its τ' is the sums' own election
    # A unit the fused kernels take as stored needs no float32 copies (they cost a quarter of the pass).
    as_stored = (not shares_unified or method.elects) and executor.native_ready(task, base, inputs)
    b, ms = (base, inputs) if as_stored else executor.inputs(task, base, inputs)
    merged = own_tau_uni = None
    if shares_unified:
        if not per_task and not own_elected:
            own_tau_uni = _unified_tau(executor, task, base, inputs, (b, ms), ctx)
    else:
        merged = _merged_as_written(executor, task, base, inputs, ctx, None if as_stored else (b, ms))
    several = isinstance(merged, dict)  # several outputs per tensor: no single merged weight
    sums = tensor_sums(b, ms, rows=tensor_rows(task) if band is None else b.shape[0], trim=trim,
                       merged=None if several else merged, own_tau_uni=own_tau_uni, own_elected=own_elected,
                       emr_merged=not per_task, unified_method=shares_unified,
                       numel=task.spec.numel if band is not None else None,
                       run=executor.sample_run(task) if band is None else 1)
    return sums, several


def _unified_tau(executor: AnalysisExecutor, task: TensorTask, base, inputs, floats: tuple,
                 ctx: TensorContext) -> torch.Tensor | None:
    """τ_uni of a method that shares one task vector, on these rows: from its fused kernel on the inputs as stored,
    in float32, where it has one (EMR's election in torch took 10-16 × its merge), else from ``fn`` on ``floats``."""
    method = executor.plan.method
    if method.native is not None and executor.native_ready(task, base, inputs, torch.float32):
        done = method.native(base, inputs, task.params, ctx, torch.float32)
        if done is not None:
            return method.unified(done[0], task.name)
    return method.unified(method.fn(*floats, task.params, ctx), task.name)


def _merged_as_written(executor: AnalysisExecutor, task: TensorTask, base, inputs, ctx: TensorContext,
                       floats: tuple | None):
    """The configured method's result on these rows, in the output dtype as the merge writes it (the fused kernel
    on the stored inputs where there is one, else ``fn`` on the float32 inputs: ``floats``, or converted now), or
    its dict of outputs."""
    done = executor.try_native(task, base, inputs, ctx)
    if done is not None:
        return done[0]
    b, ms = floats if floats is not None else executor.inputs(task, base, inputs)
    result = executor.plan.method.fn(b, ms, task.params, ctx)
    return result if isinstance(result, dict) else result.to(DTYPES[task.spec.dtype])


def _stats_context(plan: MergePlan, tasks: list[TensorTask], whole: TensorSums, sampled: bool) -> StatsContext:
    """The whole-model values the statistics need: the paper's EMR rescalers and the method's own."""
    emr_rescalers, _ = whole.rescale.estimate()
    emr_rescalers = np.where(np.isfinite(emr_rescalers), emr_rescalers, 1.0)  # empty mask: λ = 1, as the method
    method = plan.method
    method_rescalers = None
    if method.unified is not None:
        own = whole.method_unified
        means = method.rescaler_from_means is not None and method.rescaler_from_means(tasks[0].params)
        num, den = (own[2], own[3]) if means else (own[0], own[1])
        method_rescalers = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
    nan_on = tasks[0].params.get("nan_on") or "weights"
    return StatsContext(sampled, nan_on, emr_rescalers, method_rescalers)


def _method_meta(plan: MergePlan, tasks: list[TensorTask], ctx: StatsContext) -> dict[str, Any]:
    """The meta entries that describe the method, the models and the trim."""
    method, models = plan.method, list(tasks[0].model_names)
    return {
        "method": method.name,
        "base_model": plan.config.base_model,
        "models": models,
        "model_labels": model_labels(models),
        "trim": {"density_from": "config" if trims_by_config(method) else "default",
                 "default": DEFAULT_TRIM_DENSITY, "densities": trim_densities(method, tasks[0].params, len(models))},
        "nan_on": ctx.nan_on,
        "emr_rescalers": finite_list(ctx.emr_rescalers),
        "method_rescalers": finite_list(ctx.method_rescalers) if ctx.method_rescalers is not None else None,
    }
