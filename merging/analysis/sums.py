"""Per-tensor sums: the additive quantities every statistic of a tensor, a group or the model is derived from.

One pass over a tensor's rows (a band of it, or its sampled rows) gathers them: per row in one fused kernel
(``native.ops.row_sums``) on the CPU, else in torch over chunks of rows; summed over rows in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import native
from ..methods.emr import elect
from ..native import ops
from .estimate import RatioStrata, RowMoments
from .trim import DEFAULT_TRIM_DENSITY, Trim, whole_tensor_trim

CHUNK_ELEMENTS = 1 << 22  # the torch path runs over row chunks of about this many elements per model


@dataclass
class TensorSums:
    """Everything the statistics of one tensor (or a group, once added) are derived from.

    Totals are scaled to the whole tensor (× rows / rows read) in sampled mode; ratio moments stay per stratum.
    """

    elements: int
    rows: int
    rows_read: int
    base_sq: float  # ‖θ_base‖²
    weight_sq: np.ndarray  # (M,) ‖θ_i‖²
    gram: np.ndarray  # (M, M) ⟨τ_i, τ_j⟩
    conflict: RatioStrata  # y = conflicting elements, x = elements with ≥ 2 non-zero τ_i
    trimmed: RatioStrata  # y = |τ̃| mass against the elected sign, x = all |τ̃| mass
    mask: RatioStrata  # (k = M) y = Σ M_i, x = elements
    rescale: RatioStrata  # (k = M) y = Σ|τ_i|, x = Σ|M_i ⊙ τ_uni|
    emr_dot: np.ndarray  # (3, M): ⟨τ_i, τ_uni⟩, ⟨τ_i, M_i τ_uni⟩, ‖M_i τ_uni‖²
    uni_sq: float  # ‖τ_uni‖²
    emr_tau_sq: np.ndarray  # (M,) ‖τ_i‖² over the tensors EMR merges (all but those a method keeps per task)
    dist_sq: np.ndarray | None = None  # (M,) ‖θ_merged − θ_i‖² (methods that write one merged tensor)
    # A method's own unified task vector τ' (``MergeMethod.unified``): (7, M): Σ|τ_i|, Σ|M'_i τ'|, the same divided
    # by numel (per-tensor means), ⟨τ_i, M' τ'⟩, ‖M' τ'‖², ‖τ_i‖² — over the tensors the method merges (distance 0
    # elsewhere).
    method_unified: np.ndarray | None = None

    @staticmethod
    def add(parts: list[TensorSums]) -> TensorSums:
        def total(attr):
            values = [getattr(p, attr) for p in parts]
            return None if any(v is None for v in values) else sum(values[1:], values[0])

        def strata(attr):
            return RatioStrata.concat([getattr(p, attr) for p in parts])

        return TensorSums(
            elements=sum(p.elements for p in parts), rows=sum(p.rows for p in parts),
            rows_read=sum(p.rows_read for p in parts), base_sq=total("base_sq"), weight_sq=total("weight_sq"),
            gram=total("gram"), conflict=strata("conflict"), trimmed=strata("trimmed"), mask=strata("mask"),
            rescale=strata("rescale"), emr_dot=total("emr_dot"), uni_sq=total("uni_sq"),
            emr_tau_sq=total("emr_tau_sq"), dist_sq=total("dist_sq"), method_unified=total("method_unified"))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor as (rows, columns): its first dimension are the rows (a scalar is one row of one)."""
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(t.shape[0], -1)


def tensor_sums(base: torch.Tensor, models: list[torch.Tensor], *, rows: int | None = None,
                trim_density: list[float] | None = None, trim: Trim | None = None,
                merged: torch.Tensor | None = None, own_tau_uni: torch.Tensor | None = None,
                own_elected: bool = False, emr_merged: bool = True, unified_method: bool = False,
                numel: int | None = None, run: int = 1) -> TensorSums:
    """The sums of one tensor from ``base`` and ``models`` (the whole tensor, a band of it, or its rows read).

    ``rows``: the tensor's full row count (default: the rows given, i.e. an exact pass); ``run``: the rows given
    come in clusters of this many consecutive rows (a sampled tensor's ``RowSample.run``). ``trim``: each model's
    trim of these rows; without it the rows given are trimmed as a whole tensor at ``trim_density`` (per model,
    default 0.2). ``numel``: the whole tensor's size when this is a band of it. ``merged``: the configured method's
    result on the same rows (for the distance). ``unified_method``: the method shares one task vector; then
    ``own_tau_uni`` is its τ_uni on these rows, or None for a tensor it keeps per task; ``own_elected``: that τ_uni
    is the election these sums make for EMR's figures, so the method's own sums are those (no ``own_tau_uni``).
    ``emr_merged``: False for such a tensor (the paper's EMR figures leave it out too).

    Inputs are float32, or as stored when the fused kernel takes them. The torch path runs over chunks of rows, the
    task vectors stacked row-first (rows, models, columns) so that every inner product is a batched matrix product;
    sums are taken per row in float32 (a row is at most a few thousand elements) and over rows in float64.
    """
    n_models = len(models)
    b = _as_rows(base)
    ms = [_as_rows(m) for m in models]
    read, cols = b.shape
    rows = read if rows is None else rows
    scale = rows / read if read else 0.0
    if trim is None:
        trim = whole_tensor_trim(b, ms, trim_density or [DEFAULT_TRIM_DENSITY] * n_models)
    uni_m = _as_rows(own_tau_uni) if own_tau_uni is not None else None
    merged_rows = _as_rows(merged) if merged is not None else None

    def over_rows(per_row: torch.Tensor) -> torch.Tensor:
        return per_row.to(torch.float64).sum(dim=0).cpu()

    conflict, trimmed = RowMoments(rows, read, 1, run), RowMoments(rows, read, 1, run)
    mask, rescale = RowMoments(rows, read, n_models, run), RowMoments(rows, read, n_models, run)
    base_sq = torch.zeros((), dtype=torch.float64)
    weight_sq = torch.zeros(n_models, dtype=torch.float64)
    gram = torch.zeros(n_models, n_models, dtype=torch.float64)
    emr_dot = torch.zeros(3, n_models, dtype=torch.float64)
    uni_sq = torch.zeros((), dtype=torch.float64)
    dist_sq = torch.zeros(n_models, dtype=torch.float64)
    own = torch.zeros(7, n_models, dtype=torch.float64)
    fused = native.usable(b.device, b, *ms) and read > 0 and cols > 0 and n_models <= native.MAX_INPUTS
    kept = None if fused else [trim.keep(i, (m - b).abs_()) for i, m in enumerate(ms)]
    # the fused kernel takes every row at once; torch's chunks hold whole clusters
    step = read if fused else -(-max(1, CHUNK_ELEMENTS // max(cols, 1)) // run) * run
    for r0 in range(0, read, step):
        r1 = min(read, r0 + step)
        if fused:
            q = ops.row_sums(b, ms, trim.rules(), emr_merged, merged_rows, uni_m)
        else:
            q = _row_sums_torch(b[r0:r1], [m[r0:r1] for m in ms], [k[r0:r1] for k in kept], emr_merged,
                                None if merged_rows is None else merged_rows[r0:r1],
                                None if uni_m is None else uni_m[r0:r1])
        base_sq += over_rows(q["base_sq"])
        weight_sq += over_rows(q["weight_sq"])
        gram += over_rows(q["gram"])
        conflict.add(q["both"][None], q["eligible"][None])
        trimmed.add(q["against"][None], q["mass"][None])
        if emr_merged:
            mask.add(q["count"].T, torch.full((r1 - r0,), cols, dtype=torch.float64))
            rescale.add(q["abs"].T, q["abs_masked"].T)
            emr_dot += torch.stack([over_rows(q["dot"]), over_rows(q["masked_dot"]), over_rows(q["masked_sq"])])
            uni_sq += over_rows(q["uni_sq"])
        if merged_rows is not None:
            dist_sq += over_rows(q["dist"])
        if uni_m is not None or own_elected:
            numel = numel or rows * cols
            prefix = "" if own_elected else "own_"
            abs_total, abs_masked_total = over_rows(q["abs"]), over_rows(q[prefix + "abs_masked"])
            own += torch.stack([abs_total, abs_masked_total, abs_total / numel, abs_masked_total / numel,
                                over_rows(q[prefix + "masked_dot"]), over_rows(q[prefix + "masked_sq"]),
                                over_rows(q["gram"].diagonal(dim1=1, dim2=2))])
    emr_tau_sq = gram.diagonal().clone() if emr_merged else torch.zeros(n_models, dtype=torch.float64)
    return TensorSums(
        elements=rows * cols, rows=rows, rows_read=read, base_sq=float(base_sq) * scale,
        weight_sq=weight_sq.numpy() * scale, gram=gram.numpy() * scale, conflict=conflict.strata(),
        trimmed=trimmed.strata(), mask=mask.strata(), rescale=rescale.strata(),
        emr_dot=emr_dot.numpy() * scale, uni_sq=float(uni_sq) * scale, emr_tau_sq=emr_tau_sq.numpy() * scale,
        dist_sq=dist_sq.numpy() * scale if merged is not None else None,
        method_unified=own.numpy() * scale if unified_method else None)


def _row_sums_torch(bb: torch.Tensor, ms: list[torch.Tensor], kept: list[torch.Tensor], emr_merged: bool,
                    merged: torch.Tensor | None, uni_m: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The per-row sums of a chunk of rows (``native.ops.row_sums`` computes the same in one fused pass), with the
    task vectors stacked row-first (rows, models, columns) so that every inner product is a batched product.
    ``kept``: per model, the trim's mask of these rows."""
    tau = torch.stack([m - bb for m in ms], dim=1)  # (r, M, C)
    q = {"base_sq": bb.square().sum(dim=-1), "weight_sq": torch.stack([m.square().sum(dim=-1) for m in ms], dim=1)}
    q["gram"] = torch.bmm(tau, tau.transpose(1, 2))  # (r, M, M)
    q["abs"] = tau.abs().sum(dim=-1)  # (r, M) Σ|τ_i| per row
    # sign conflicts: ≥ 2 non-zero entries, and both signs present among them
    q["both"] = ((tau > 0).any(dim=1) & (tau < 0).any(dim=1)).sum(dim=-1)
    q["eligible"] = ((tau != 0).sum(dim=1) >= 2).sum(dim=-1)
    # TIES trim, elected sign of the trimmed sum (0 counts as +), |τ̃| mass against it
    trimmed = torch.stack([tau[:, i] * keep for i, keep in enumerate(kept)], dim=1)
    elected = torch.where(trimmed.sum(dim=1) >= 0, 1.0, -1.0).unsqueeze(1)
    q["mass"] = trimmed.abs().sum(dim=(1, 2))
    q["against"] = trimmed.mul_(elected).neg_().clamp_min_(0).sum(dim=(1, 2))  # |τ̃_i| where sign(τ̃_i) = −s
    del trimmed, elected
    # EMR's election, masks and the sums behind its rescalers and reconstruction errors
    if emr_merged:
        uni = elect(tau.transpose(0, 1))  # (r, C): EMR's τ_uni, s · max of the agreeing |τ_i|
        q["count"], q["abs_masked"], q["masked_sq"], q["dot"], q["masked_dot"] = _masked_sums(tau, uni)
        q["uni_sq"] = uni.square().sum(dim=-1)
    if merged is not None:
        q["dist"] = ((merged - bb).unsqueeze(1) - tau).square_().sum(dim=-1)
    if uni_m is not None:
        _, q["own_abs_masked"], q["own_masked_sq"], _, q["own_masked_dot"] = _masked_sums(tau, uni_m)
    return q


def _masked_sums(tau: torch.Tensor, uni: torch.Tensor):
    """Per row and model, for M_i = (τ_i ⊙ τ_uni > 0): Σ M_i, Σ|M_i τ_uni|, ‖M_i τ_uni‖², ⟨τ_i, τ_uni⟩ and
    ⟨τ_i, M_i τ_uni⟩ (= Σ max(τ_i τ_uni, 0)); each (r, M). The three masked sums are one batched product."""
    product = tau * uni.unsqueeze(1)  # (r, M, C)
    dot = product.sum(dim=-1)
    masks = (product > 0).to(tau.dtype)
    features = torch.stack([torch.ones_like(uni), uni.abs(), uni.square()], dim=-1)  # (r, C, 3)
    masked = torch.bmm(masks, features)  # (r, M, 3)
    masked_dot = product.clamp_min_(0).sum(dim=-1)
    return masked[..., 0], masked[..., 1], masked[..., 2], dot, masked_dot
