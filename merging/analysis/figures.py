"""From sums to the statistics of the JSON (``schema``): per tensor, per group (embeddings, each layer, head, other)
and for the whole model, with the short model labels the charts use."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..architectures import Layers
from ..methods.coefficients import nan_coefficients
from ..plan import TensorTask
from .estimate import finite, rates
from .sums import TensorSums

_HEAD_HINTS = ("lm_head", "embed_out", "classifier", "score.", "head.")
_EMBED_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "cls_token", "pos_", "shared.weight")
_GROUP_ORDER = {"embeddings": 0, "layer": 1, "head": 2, "other": 3}


@dataclass
class StatsContext:
    """What turning sums into statistics needs beyond the sums: whole-model values known after the pass."""

    sampled: bool  # rates get 95% intervals
    nan_on: str = "weights"  # NAN's α from ‖θ_i‖ ("weights") or ‖τ_i‖ ("task_vector")
    emr_rescalers: np.ndarray | None = None  # the paper's whole-model λ_i
    method_rescalers: np.ndarray | None = None  # the whole-model λ_i of a method sharing one task vector


def finite_list(values) -> list[float | None]:
    return [finite(v) for v in np.asarray(values, dtype=float).reshape(-1)]


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _errors(tau_sq: np.ndarray, dot: np.ndarray, approx_sq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """‖τ − c·a‖ / ‖τ‖ from ‖τ‖², ⟨τ, a⟩, ‖a‖² and the factor c: √(‖τ‖² − 2c⟨τ,a⟩ + c²‖a‖²) / ‖τ‖."""
    sq = np.maximum(tau_sq - 2 * scale * dot + scale * scale * approx_sq, 0)
    return _safe_div(np.sqrt(sq), np.sqrt(tau_sq))


def _emr_figures(sums: TensorSums, ctx: StatsContext, tau_sq: np.ndarray) -> dict[str, Any]:
    """The paper's EMR on these tensors: mask densities, local rescalers, and each task's reconstruction errors."""
    lam = ctx.emr_rescalers if ctx.emr_rescalers is not None else np.ones_like(tau_sq)
    ones = np.ones_like(tau_sq)
    return {
        "mask_density": rates(sums.mask, ctx.sampled),
        "rescaler": rates(sums.rescale, ctx.sampled, clip=False),
        "reconstruction_error": {
            "unified": finite_list(_errors(sums.emr_tau_sq, sums.emr_dot[0], np.full_like(tau_sq, sums.uni_sq),
                                           ones)),
            "masked": finite_list(_errors(sums.emr_tau_sq, sums.emr_dot[1], sums.emr_dot[2], ones)),
            "masked_rescaled": finite_list(_errors(sums.emr_tau_sq, sums.emr_dot[1], sums.emr_dot[2], lam)),
        },
    }


def _merged_distance(sums: TensorSums, ctx: StatsContext, tau_norm: np.ndarray) -> np.ndarray | None:
    """‖θ_merged − θ_i‖ / ‖τ_i‖; for a method sharing one task vector, task i's rebuilt θ_base + λ_i M_i ⊙ τ_uni."""
    if sums.method_unified is not None and ctx.method_rescalers is not None:
        own, lam = sums.method_unified, ctx.method_rescalers
        # tensors kept per task add ‖τ_i‖² to the denominator and nothing to the error
        err_sq = np.maximum(own[6] - 2 * lam * own[4] + lam ** 2 * own[5], 0)
        return _safe_div(np.sqrt(err_sq), tau_norm)
    if sums.dist_sq is not None:
        return _safe_div(np.sqrt(np.maximum(sums.dist_sq, 0)), tau_norm)
    return None


def derive(sums: TensorSums, ctx: StatsContext) -> dict[str, Any]:
    """The statistics of one tensor, group or the whole model from its sums (see ``JSON_SCHEMA_DOC``)."""
    tau_sq = np.maximum(np.diagonal(sums.gram), 0)
    tau_norm = np.sqrt(tau_sq)
    base_norm = math.sqrt(max(sums.base_sq, 0))
    cosine = _safe_div(sums.gram, np.sqrt(np.outer(tau_sq, tau_sq)))
    norms_for_nan = np.sqrt(np.maximum(sums.weight_sq, 0)) if ctx.nan_on == "weights" else tau_norm
    alphas = nan_coefficients(torch.tensor(norms_for_nan, dtype=torch.float64))
    distance = _merged_distance(sums, ctx, tau_norm)
    return {
        "elements": int(sums.elements), "rows": int(sums.rows), "rows_read": int(sums.rows_read),
        "base_norm": finite(base_norm),
        "weight_norm": finite_list(np.sqrt(np.maximum(sums.weight_sq, 0))),
        "task_vector_norm": finite_list(tau_norm),
        "relative_task_vector_norm": finite_list(tau_norm / base_norm if base_norm > 0
                                                 else np.full_like(tau_norm, np.nan)),
        "sign_conflict": rates(sums.conflict, ctx.sampled)[0],
        "trimmed_sign_disagreement": rates(sums.trimmed, ctx.sampled)[0],
        "cosine_similarity": [finite_list(row) for row in cosine],
        "nan_coefficients": [float(a) for a in alphas],
        "emr": _emr_figures(sums, ctx, tau_sq),
        "merged_distance": finite_list(distance) if distance is not None else None,
    }


def group_of(name: str, layers: Layers | None = None) -> tuple[str, str, int | None]:
    """(group name, kind, layer) of a tensor: ``layer N`` inside the blocks (``encoder N`` / ``decoder N`` in a model
    with several stacks, as ``layers`` of all its names tells), else embeddings, head or other."""
    found = (layers or Layers.of([name])).group(name)
    if found is not None:
        return found[0], "layer", found[1]
    if any(h in name for h in _HEAD_HINTS) or name == "output.weight":
        return "head", "head", None
    if any(h in name for h in _EMBED_HINTS):
        return "embeddings", "embeddings", None
    return "other", "other", None


def model_labels(models: list[str]) -> list[str]:
    """Short unique names for references: the last path component, or the whole reference when that repeats."""
    short = [os.path.basename(os.path.normpath(m)) or m for m in models]
    return [s if short.count(s) == 1 else m for s, m in zip(short, models)]


def figures(per_tensor: list[tuple[TensorTask, TensorSums]], whole: TensorSums,
            ctx: StatsContext) -> dict[str, Any]:
    """The JSON's ``model``, ``groups`` (in model order) and ``tensors`` entries."""
    grouped: dict[str, list[TensorSums]] = {}
    kinds: dict[str, tuple[str, int | None]] = {}
    tensors = []
    layers = Layers.of([task.name for task, _ in per_tensor])
    stack_rank = {label: i for i, label in enumerate(dict.fromkeys(layers.labels[s] for s in layers.counts))}
    for task, sums in per_tensor:
        group, kind, layer = group_of(task.name, layers)
        grouped.setdefault(group, []).append(sums)
        kinds[group] = (kind, layer)
        tensors.append({"name": task.name, "group": group, "shape": list(task.spec.shape), **derive(sums, ctx)})
    groups = []
    def order(group: str) -> tuple[int, int, int]:
        kind, layer = kinds[group]
        stack = stack_rank.get(group.rsplit(" ", 1)[0], 0) if kind == "layer" else 0
        return _GROUP_ORDER[kind], stack, layer or 0

    for group in sorted(grouped, key=order):
        kind, layer = kinds[group]
        groups.append({"name": group, "kind": kind, "layer": layer, "tensors": len(grouped[group]),
                       **derive(TensorSums.add(grouped[group]), ctx)})
    model = {"name": "model", "kind": "model", "layer": None, "tensors": len(per_tensor), **derive(whole, ctx)}
    return {"model": model, "groups": groups, "tensors": tensors}
