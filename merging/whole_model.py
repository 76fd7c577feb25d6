"""Statistics passes: over one tensor's bands (``gather_stats``, the engine's and the analysis' per-tensor passes)
and over the whole model: what a method must know about every merged tensor before it merges any.

A method declares them as ``MergeMethod.model_stats`` (``StatsPass`` objects, as its per-tensor ``stats``); each
pass streams every band of every merged tensor through ``collect``, sums its parts (or concatenates the keys in
``concat``) over the whole model, then ``finish(combined, params, ctx)`` turns the totals into what the next pass and
the merge see as ``ctx.model_stats``; ``ctx.shape`` is then ``(D,)``, D the length of the whole task vector. TIES'
exact global top-k threshold (``topk_scope: model``) is found this way: a strided sample brackets the threshold,
a counting pass collects the few candidates inside the bracket, so memory stays bounded whatever the model's size.

A sampling pass (``sample_stride`` > 1) keeps every n-th element, more sparsely on a large model so that it keeps at
most ``MODEL_SAMPLE_ELEMENTS`` per input. The engine runs these passes before the reduction and the merge, and the
analysis before its own pass; ``model_stats_needed(plan)`` says whether a plan needs them (and validates it).
"""

from __future__ import annotations

import math

import torch

from .methods.registry import TensorContext
from .nonfinite import require_finite

MODEL_SAMPLE_ELEMENTS = 1 << 22  # a whole-model sampling pass keeps at most about this many elements per input


def gather_stats(passes, params: dict, band_inputs, context, prepare, native=None):
    """Run statistics passes over one tensor's bands and return what ``ctx.stats`` holds after them: per pass its
    ``collect`` (or the fused ``native`` form) on every band, the parts summed or concatenated, then ``finish``.

    ``band_inputs()``: a fresh iterator of (band, (base, models)) per pass; ``context(band, stats)``: a band's
    TensorContext (band None: the whole tensor); ``prepare(base, models, stride)``: the float32 tensors ``collect``
    sees (every ``stride``-th element); ``native(stats_pass, base, models, ctx)``: a pass's fused result on the
    inputs as given (whole bands: a sampling pass's kernel takes its own stride), or None. The engine runs it on
    bands it reads; the analysis also on tensors in hand.
    """
    stats = None
    for stats_pass in passes:
        if stats_pass.needed is not None and not stats_pass.needed(params):
            continue
        if stats_pass.only_if is not None and not stats_pass.only_if(stats):
            continue
        combined: dict[str, torch.Tensor] = {}
        for band, (base, models) in band_inputs():
            ctx = context(band, stats)
            stride = stats_pass.sample_stride
            part = native(stats_pass, base, models, ctx) if native is not None else None
            if part is None:
                part = stats_pass.collect(*prepare(base, models, stride), params, ctx)
            combine(part, combined, stats_pass.concat)
        for key in stats_pass.concat:
            if key in combined:
                combined[key] = torch.cat(combined[key])
        stats = stats_pass.finish(combined, params, context(None, stats)) if stats_pass.finish else combined
    return stats


def combine(part: dict, combined: dict, concat: tuple[str, ...]) -> None:
    """Add one band's statistics to the totals: summed, or collected for concatenation (keys in ``concat``)."""
    for key, value in part.items():
        if key not in combined:
            combined[key] = [value] if key in concat else value
        elif key in concat:
            combined[key].append(value)
        else:
            combined[key] = combined[key] + value


def merged_elements(task) -> int:
    """How many elements of ``task`` the method merges (only the shared rows, with a vocabulary mismatch)."""
    if task.shared_rows is None:
        return task.spec.numel
    return task.shared_rows * (task.spec.numel // task.spec.shape[0])


def wants_model_stats(plan) -> bool:
    """Whether ``plan`` needs its method's whole-model statistics (the hook also validates the plan)."""
    method = plan.method
    return bool(method.model_stats) and (method.model_stats_needed is None or bool(method.model_stats_needed(plan)))


def model_statistics(executor):
    """Run the plan's method's whole-model statistics passes over ``executor``'s sources (an ``engine.Executor``)
    and set ``executor.model_stats`` (every later ``TensorContext`` carries it); returns it (None: not needed)."""
    plan = executor.plan
    if not wants_model_stats(plan):
        return None
    tasks = [t for t in plan.tasks if not t.copy]
    numel = sum(merged_elements(t) for t in tasks)
    params = tasks[0].params
    stats = None
    for stats_pass in plan.method.model_stats:
        if stats_pass.needed is not None and not stats_pass.needed(params):
            continue
        if stats_pass.only_if is not None and not stats_pass.only_if(stats):
            continue
        stride = stats_pass.sample_stride
        if stride > 1:
            stride = max(stride, math.ceil(numel / MODEL_SAMPLE_ELEMENTS))
        combined: dict = {}
        executor.model_stats = stats
        for task, band, base, models in executor.stream(tasks, "reduce", banded=True):
            if stats is None:  # the first pass sees every input first
                require_finite(plan.method.name, task, base, models)
            ctx = executor.context(task, band, None, None)
            part = stats_pass.collect(*executor.stats_inputs(task, base, models, stride), task.params, ctx)
            combine({k: v.reshape(-1) if k in stats_pass.concat else v for k, v in part.items()}, combined,
                    stats_pass.concat)
        for key in stats_pass.concat:
            if key in combined:
                combined[key] = torch.cat(combined[key])
        whole = TensorContext("(whole model)", plan.config.seed, None, tasks[0].model_names, shape=(numel,),
                              model_stats=stats, num_layers=plan.num_layers)
        stats = stats_pass.finish(combined, params, whole) if stats_pass.finish else combined
    executor.model_stats = stats
    return stats
