"""EMR-Merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free High-Performance
Model Merging", arXiv:2405.17461).

EMR does not produce one checkpoint. It stores one unified task vector shared by every task, and for each task a
1-bit mask and one scalar, from which that task's model is rebuilt on demand. With τ_i = θ_i − θ_base, per element:

    elect:    s = sign(Σ_i τ_i), an exact 0 counting as −1          (as the official code: ``(Σ > 0) · 2 − 1``)
              τ_uni = s · max{ |τ_i| : τ_i · s > 0 }                 (0 where no task agrees)
    mask:     M_i = (τ_i ⊙ τ_uni > 0)                               (strict: τ_i = 0 is masked out)
    rescale:  λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|                         (one scalar per task)
    task i:   θ_i' = θ_base + λ_i · (M_i ⊙ τ_uni)

The sign of an exact zero sum only matters where the task vectors cancel exactly (+a and −a): the choice is
symmetric, and following the official code keeps our τ_uni identical to it. Where every τ_i is 0 both choices
give τ_uni = 0 and all masks off.

``rescaler`` picks how the sums in λ_i run: ``model`` (default) sums over every merged element of the whole model,
as the paper writes it (and its 30-task script computes); ``tensor_mean`` sums each tensor's *mean*, as the
official 8-task and language-model scripts do (each tensor weighted by 1/numel). Either way the totals come from
the engine's streaming reduction pass; a task whose mask is empty everywhere gets λ = 1 (its rebuilt vector is 0).

``skip`` lists name substrings of tensors that are not merged but kept per task (the classification heads of the
paper's vision setting): they are stored whole for every task and restored as they were by ``emr-extract``.
Integer tensors are copied once from the base, as in any merge.

``emr_rescale`` applies only EMR's mask-and-rescale on top of another registered task-vector method: τ_uni is that
method's merged task vector (its result minus the base), then masks and rescalers as above. The paper (Table 6)
shows this lifts task arithmetic and TIES. The other method's parameters are passed through where
``emr_rescale`` declares them (weight, density, gamma, epsilon, normalize); the rest take that method's defaults.
Its ``lambda`` is left at 1: the rescalers cancel any overall scale of τ_uni.

Stored in the output folder, in ``merge.safetensors`` (or its shards ``merge-0000k-of-0000n.safetensors``): not
``model.safetensors``, so that transformers refuses the folder instead of loading a model without its weights
(the folder is not a model; ``emr-extract`` writes one):
    emr.tau_uni.<name>   τ_uni in the output dtype, the base's shape
    emr.mask.<k>.<name>  task k's mask, 1 bit per element (uint8, numpy.packbits order: row-major, first element
                         in the most significant bit, the last byte padded with zeros), ceil(numel / 8) bytes
    emr.task.<k>.<name>  a ``skip`` tensor as task k has it (output dtype)
    <name>               an integer tensor, copied from the base
    emr.json             task names, rescalers, variant, base reference, tensor list, storage report
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch

from ..errors import ConfigError
from ..native import ops
from ..sources import TensorSpec
from .registry import REDUCED, REGISTRY, MergeMethod, Param, Preset, TensorContext, register

PAPER = "Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging (NeurIPS, arXiv:2405.17461)"
META_FILE = "emr.json"
FORMAT = "mergescope-emr"
FORMAT_VERSION = 1
RESCALER_BYTES = 8  # each λ_i is kept as a float64 in emr.json


def tau_uni_name(name: str) -> str:
    return f"emr.tau_uni.{name}"


def mask_name(task: int, name: str) -> str:
    return f"emr.mask.{task}.{name}"


def task_tensor_name(task: int, name: str) -> str:
    return f"emr.task.{task}.{name}"


# --- the formulas ------------------------------------------------------------------------------------------------

def elect(task_vectors: torch.Tensor) -> torch.Tensor:
    """τ_uni from stacked task vectors (N, ...): s = sign(Σ_i τ_i) with 0 → −1, then s · max over the tasks
    agreeing with s of |τ_i| (0 where none agrees)."""
    sign = torch.where(task_vectors.sum(dim=0) > 0, 1.0, -1.0).to(task_vectors.dtype)
    agreeing = (task_vectors * sign) > 0
    magnitude = torch.where(agreeing, task_vectors.abs(), torch.zeros_like(task_vectors)).amax(dim=0)
    return sign * magnitude


def task_masks(task_vectors: torch.Tensor, tau_uni: torch.Tensor) -> torch.Tensor:
    """M_i = (τ_i ⊙ τ_uni > 0), stacked as bool (N, ...)."""
    return (task_vectors * tau_uni) > 0


def rescaler_terms(task_vectors: torch.Tensor, masks: torch.Tensor, tau_uni: torch.Tensor,
                   variant: str, numel: int | None = None) -> torch.Tensor:
    """This tensor's share of the rescaler sums, float64 (3N,): [Σ|τ_i|], [Σ|M_i ⊙ τ_uni|], [Σ M_i].

    With ``tensor_mean`` the first two are means (divided by the whole tensor's ``numel``, so that the shares of
    its row bands add up to the mean); the mask counts stay counts (for density).
    """
    n = task_vectors.shape[0]
    flat_tv = task_vectors.reshape(n, -1)
    flat_masked = torch.where(masks.reshape(n, -1), tau_uni.reshape(1, -1).abs(), torch.zeros_like(flat_tv))
    numerator = flat_tv.abs().sum(dim=1, dtype=torch.float64)
    denominator = flat_masked.sum(dim=1, dtype=torch.float64)
    count = masks.reshape(n, -1).sum(dim=1).to(torch.float64)
    numel = numel or flat_tv.shape[1]
    if variant == "tensor_mean" and numel > 0:
        numerator = numerator / numel
        denominator = denominator / numel
    return torch.cat([numerator, denominator, count]).cpu()


def rescalers_from_totals(totals: torch.Tensor, n: int) -> list[float]:
    """λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| from the summed reduction; 1 where the denominator is 0 (empty mask)."""
    numerator, denominator = totals[:n].tolist(), totals[n:2 * n].tolist()
    return [num / den if den > 0 else 1.0 for num, den in zip(numerator, denominator)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 (ceil(numel / 8),), 8 elements a byte in row-major order, the first in the most
    significant bit, the tail padded with 0 (the layout of ``numpy.packbits(mask.ravel())``)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The inverse of ``pack_bits``: a bool tensor of ``shape``."""
    numel = math.prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(tuple(shape))


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def is_skipped(name: str, skip: tuple[str, ...] | list[str]) -> bool:
    """Whether tensor ``name`` is kept per task instead of merged (a ``skip`` substring occurs in it)."""
    return any(pattern and pattern in name for pattern in skip)


# --- τ_uni: EMR's own election, or another method's merged task vector ------------------------------------------

def _unified_by_election(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext,
                         task_vectors: torch.Tensor) -> torch.Tensor:
    return elect(task_vectors)


def unifying_method(name: str, where: str) -> MergeMethod:
    """The registered method ``emr_rescale`` may take τ_uni from: one on a base that returns one tensor."""
    method = REGISTRY.get(name)
    if method is None or method.base != "required" or method.outputs is not None or name.startswith("emr"):
        usable = sorted(m.name for m in REGISTRY.values()
                        if m.base == "required" and m.outputs is None and not m.name.startswith("emr"))
        raise ConfigError(f"{where}: `unify: {name}` is not a task-vector method (use one of: {', '.join(usable)})")
    return method


def _unified_by_method(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext,
                       task_vectors: torch.Tensor) -> torch.Tensor:
    """τ_uni = (the ``unify`` method's merge) − θ_base, its parameters passed through where declared here."""
    method = unifying_method(params["unify"], ctx.name)
    sub: dict[str, Any] = {}
    for p in method.params:
        if p.name in params:
            sub[p.name] = params[p.name]
        else:
            sub[p.name] = [p.default] * len(models) if p.per_model else p.default
    inner = dataclasses.replace(ctx, reduced=None)  # our reduction is not the other method's
    return method.fn(base, models, sub, inner) - base


# --- the fused kernels (merging/native): EMR's own election, on the inputs as stored ---------------------------

def _rescaler_shares(sums: torch.Tensor, n: int, params: dict, ctx: TensorContext) -> torch.Tensor:
    """``rescaler_terms`` from the kernel's sums: the first two groups as means with ``tensor_mean``."""
    numel = math.prod(ctx.shape) if ctx.shape else 0
    if params["rescaler"] == "tensor_mean" and numel > 0:
        sums = torch.cat([sums[:2 * n] / numel, sums[2 * n:]])
    return sums


def _emr_native(base, models, params, ctx, out_dtype):
    """τ_uni and the packed masks in one pass, with this band's share of the rescaler sums (REDUCED)."""
    if is_skipped(ctx.name, params["skip"]):
        return None
    _check_shape(base, ctx)
    tau, masks, sums = ops.emr(base, models, out_dtype)
    out = {tau_uni_name(ctx.name): tau, REDUCED: _rescaler_shares(sums, len(models), params, ctx)}
    for k, mask in enumerate(masks):
        out[mask_name(k, ctx.name)] = mask
    return out, None


def _emr_native_reduce(base, models, params, ctx):
    if is_skipped(ctx.name, params["skip"]):
        return None
    _check_shape(base, ctx)
    return _rescaler_shares(ops.emr(base, models, None)[2], len(models), params, ctx)


# --- the engine hooks -------------------------------------------------------------------------------------------

def _check_shape(base: torch.Tensor, ctx: TensorContext) -> None:
    if ctx.shape and ctx.band is None and tuple(base.shape) != tuple(ctx.shape):
        raise ConfigError(f"{ctx.name}: EMR needs every input with the base's shape (allow_vocab_mismatch is not "
                          "supported: the masks cover whole tensors)")


def _make_fns(unify):
    def emr_reduce(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
        """This tensor's share of the rescaler sums (see ``rescaler_terms``); zeros for ``skip`` tensors."""
        if is_skipped(ctx.name, params["skip"]):
            return torch.zeros(3 * len(models), dtype=torch.float64)
        _check_shape(base, ctx)
        task_vectors = torch.stack([theta - base for theta in models])
        tau_uni = unify(base, models, params, ctx, task_vectors)
        return rescaler_terms(task_vectors, task_masks(task_vectors, tau_uni), tau_uni, params["rescaler"],
                              math.prod(ctx.shape) if ctx.shape else None)

    def emr_merge(base: torch.Tensor, models: list[torch.Tensor], params: dict,
                  ctx: TensorContext) -> dict[str, torch.Tensor]:
        """τ_uni and each task's packed mask M_i = (τ_i ⊙ τ_uni > 0); ``skip`` tensors: each task's own θ_i."""
        if is_skipped(ctx.name, params["skip"]):
            return {task_tensor_name(k, ctx.name): theta for k, theta in enumerate(models)}
        _check_shape(base, ctx)
        task_vectors = torch.stack([theta - base for theta in models])
        tau_uni = unify(base, models, params, ctx, task_vectors)
        out = {tau_uni_name(ctx.name): tau_uni}
        for k, mask in enumerate(task_masks(task_vectors, tau_uni)):
            out[mask_name(k, ctx.name)] = pack_bits(mask)
        return out

    return emr_reduce, emr_merge


def emr_outputs(task) -> list[tuple[str, TensorSpec]]:
    """What one merged tensor becomes: τ_uni and N packed masks, or N per-task copies for ``skip`` tensors."""
    n = len(task.inputs)
    if task.shared_rows is not None:
        raise ConfigError(f"{task.name}: EMR needs every input with the base's shape (allow_vocab_mismatch is not "
                          "supported: the masks cover whole tensors)")
    if is_skipped(task.name, task.params["skip"]):
        return [(task_tensor_name(k, task.name), task.spec) for k in range(n)]
    mask_spec = TensorSpec("U8", (packed_size(task.spec.numel),))
    return [(tau_uni_name(task.name), task.spec)] + [(mask_name(k, task.name), mask_spec) for k in range(n)]


def check_plan(plan) -> bool:
    """Validation that needs the whole plan, run by the engine before the first tensor is read (through the
    ``reduce_needed`` hook, which is the earliest call with the plan); EMR always needs its reduction."""
    if plan.config.slices:
        raise ConfigError(f"config: merge_method {plan.method.name!r} does not take `slices`; list the fine-tunes "
                          "under `models`")
    if plan.method.name == "emr_rescale":
        for value in {t.params["unify"] for t in plan.tasks if not t.copy}:
            unifying_method(value, "config: parameters")
    variants = {t.params["rescaler"] for t in plan.tasks if not t.copy}
    if len(variants) > 1:
        raise ConfigError(f"config: `rescaler` must be one value for the whole model, got {sorted(variants)}")
    return True


def storage_report(plan) -> dict[str, Any]:
    """Bytes EMR stores, against N separate checkpoints in the output dtype (the base is referenced, not stored)."""
    merged = [t for t in plan.tasks if not t.copy]
    n = len(merged[0].inputs) if merged else 0
    unified = per_task = masks = shared = 0
    for t in plan.tasks:
        if t.copy:
            shared += t.spec.nbytes
        elif is_skipped(t.name, t.params["skip"]):
            per_task += n * t.spec.nbytes
        else:
            unified += t.spec.nbytes
            masks += n * packed_size(t.spec.numel)
    rescalers = n * RESCALER_BYTES
    modulators = masks + rescalers + per_task
    total = unified + shared + modulators
    checkpoint = plan.total_bytes_out
    return {
        "tasks": n,
        "unified_task_vector_bytes": unified,
        "mask_bytes": masks,
        "rescaler_bytes": rescalers,
        "per_task_tensor_bytes": per_task,
        "shared_copied_bytes": shared,
        "modulator_bytes": modulators,
        "modulator_bytes_per_task": modulators // n if n else 0,
        "emr_total_bytes": total,
        "checkpoint_bytes": checkpoint,
        "n_checkpoints_bytes": n * checkpoint,
        "emr_to_n_checkpoints": total / (n * checkpoint) if n and checkpoint else None,
        "base_bytes_referenced": checkpoint,
        "merged_parameters": sum(t.spec.numel for t in merged if not is_skipped(t.name, t.params["skip"])),
    }


def _base_location(ref: str | None) -> str | None:
    """The base as extract should open it: an absolute path when it is local, else the reference (Hub id)."""
    if ref is None:
        return None
    return os.path.abspath(ref) if os.path.exists(ref) else ref


def emr_finalize(plan, reduced: torch.Tensor | None) -> dict[str, bytes]:
    """emr.json: tasks with their rescalers and mask densities, the variant, the base, the tensors, the storage."""
    merged = [t for t in plan.tasks if not t.copy]
    names = list(merged[0].model_names) if merged else []
    n = len(names)
    totals = reduced if reduced is not None else torch.zeros(3 * n, dtype=torch.float64)
    rescalers = rescalers_from_totals(totals, n)
    kept = [t for t in merged if not is_skipped(t.name, t.params["skip"])]
    elements = sum(t.spec.numel for t in kept)
    params = merged[0].params if merged else {}
    tensors = []
    for t in plan.tasks:
        kind = "copied" if t.copy else ("per_task" if is_skipped(t.name, t.params["skip"]) else "merged")
        tensors.append({"name": t.name, "shape": list(t.spec.shape), "dtype": t.spec.dtype, "kind": kind})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": plan.method.name,
        "paper": PAPER,
        "unify": params.get("unify", "elect"),
        "rescaler": params.get("rescaler", "model"),
        "sign_of_zero_sum": -1,
        "skip": list(params.get("skip", ())),
        "base_model": plan.config.base_model,
        "base_path": _base_location(plan.config.base_model),
        "tasks": [
            {"index": k, "model": name, "rescaler": rescalers[k],
             "abs_task_vector_sum": float(totals[k]), "abs_masked_unified_sum": float(totals[n + k]),
             "mask_density": float(totals[2 * n + k]) / elements if elements else 0.0}
            for k, name in enumerate(names)
        ],
        "tensors": tensors,
        "storage": storage_report(plan),
    }
    return {META_FILE: (json.dumps(meta, indent=2) + "\n").encode()}


# --- registration -------------------------------------------------------------------------------------------------

RESCALER = Param("rescaler", str, "model", "λ_i's sums: over the whole `model` (the paper) or sums of per-tensor "
                 "means, `tensor_mean` (the official code)", choices=("model", "tensor_mean"))
SKIP = Param("skip", list, (), "name substrings of tensors kept per task instead of merged (e.g. classification "
             "heads); restored by emr-extract")
def _unified_of(result: dict, name: str) -> torch.Tensor | None:
    """``unified`` hook: τ_uni from a merged tensor's outputs (None for a ``skip`` tensor, kept per task)."""
    return result.get(tau_uni_name(name))


def _skipped(name: str, params: dict) -> bool:
    return is_skipped(name, params["skip"])


def _rescaler_from_means(params: dict) -> bool:
    return params["rescaler"] == "tensor_mean"


VISION = Preset("paper", "vision: classification heads kept per task (Huang et al.)", {"skip": ["head."]})

_emr_reduce, _emr_merge = _make_fns(_unified_by_election)
_emr_reduce.__doc__ = "EMR's reduction: the shares of Σ|τ_i|, Σ|M_i ⊙ τ_uni| and Σ M_i of one tensor."
_emr_merge.__doc__ = ("EMR-Merging (Huang et al. 2024): τ_uni = s · max_{i: τ_i s > 0} |τ_i|, "
                      "s = sign(Σ τ_i); M_i = (τ_i ⊙ τ_uni > 0); stored packed, one bit per element.")
register(MergeMethod(
    name="emr", fn=_emr_merge,
    summary="elect one unified task vector, store a 1-bit mask and a rescaler per task; rebuild any task with "
            "emr-extract",
    paper=PAPER, params=(RESCALER, SKIP), presets=(VISION,), base="required", min_models=1,
    reduce=_emr_reduce, reduce_needed=check_plan, finalize=emr_finalize, outputs=emr_outputs, model_output=False,
    elementwise=True,  # τ_uni and the masks are per element; the rescaler sums add up over row bands
    reduce_after_merge=True,  # the rescalers only go to emr.json: gathered in the merge pass, no second read
    native=_emr_native, native_reduce=_emr_native_reduce, unified=_unified_of, elects=True, skipped=_skipped,
    rescaler_from_means=_rescaler_from_means,
))

_rescale_reduce, _rescale_merge = _make_fns(_unified_by_method)
_rescale_merge.__doc__ = ("EMR's mask and rescale on another method's merge: τ_uni = merge_unify(θ) − θ_base, "
                          "M_i = (τ_i ⊙ τ_uni > 0), λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|.")
register(MergeMethod(
    name="emr_rescale", fn=_rescale_merge,
    summary="EMR's per-task masks and rescalers on top of another method's merged task vector (e.g. TIES)",
    paper=PAPER,
    params=(Param("unify", str, "task_arithmetic", "the registered task-vector method whose merged task vector "
                  "becomes τ_uni (task_arithmetic, ties, dare_ties, breadcrumbs_ties, ...)"),
            Param("weight", float, 1.0, "passed to `unify`: how much this model's task vector counts",
                  per_model=True),
            Param("density", float, 1.0, "passed to `unify` (ties, dare_*, breadcrumbs*, della*): fraction kept",
                  per_model=True, min=0.0, max=1.0, min_exclusive=True),
            Param("gamma", float, 0.01, "passed to `unify` (breadcrumbs*): fraction dropped as outliers",
                  per_model=True, min=0.0, max=1.0),
            Param("epsilon", float, 0.15, "passed to `unify` (della*): spread of keep probabilities",
                  per_model=True, min=0.0, max=1.0),
            Param("normalize", bool, True, "passed to `unify`: TIES' disjoint mean (for task arithmetic a constant "
                  "factor that the rescalers cancel)"),
            RESCALER, SKIP),
    presets=(VISION,), base="required", min_models=1, randomized=False,
    reduce=_rescale_reduce, reduce_needed=check_plan, finalize=emr_finalize, outputs=emr_outputs,
    model_output=False, reduce_after_merge=True, unified=_unified_of, skipped=_skipped,
    rescaler_from_means=_rescaler_from_means,
))
