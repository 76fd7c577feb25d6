"""Merge diagnostics: where the fine-tunes agree, where they fight, and how the configured method resolves it.

From the same config as a merge, one streaming pass over the plan's tensor tasks gathers, per tensor, additive
sums from which every statistic is derived per tensor, per layer (the block of ``merging.architectures.Layers``;
embeddings, head and the rest as their own groups) and for the whole model. An exact pass goes by the engine's row
bands, like a merge: tensors of more than 256K elements first get the trim's exact top-k cuts (and a sparsifying
method's own) from the engine's statistics passes, a strided sample and a counting pass that the page cache serves,
so no whole tensor is ever held; smaller tensors are read once, whole. The sums run in one fused kernel
(``merging.native``) on the CPU, else in torch.
With τ_i = θ_i − θ_base (float32, on the stored values):

- task-vector norm ‖τ_i‖_F, and ‖τ_i‖ / ‖θ_base‖;
- sign-conflict rate: among elements where at least two τ_i are non-zero, the fraction whose non-zero signs are
  not all equal;
- trimmed sign disagreement: each τ_i trimmed to its top ``density`` fraction by |τ_i| (TIES' trim, exact top-k
  per tensor with ties broken by flat position), s = sign(Σ_i τ̃_i) (0 counts as +, as in TIES), then
  Σ |τ̃_i| over entries whose sign is not s, divided by Σ |τ̃_i|. ``density`` is the config's (per model and
  tensor) when the method has that parameter, else 0.2, the TIES paper's value; the weights are not applied;
- pairwise cosine similarity cos(τ_i, τ_j) = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖);
- NAN coefficients (Si et al. 2025): α_i ∝ 1/‖x_i‖_F normalized to sum to 1, with x_i = θ_i (or τ_i when the
  config sets ``nan_on: task_vector``), from the norms of the tensor, of the group, of the whole model
  (``merging.coefficients.nan_coefficients``);
- EMR-Merging (Huang et al. 2024), by the paper's formulas (``merging.methods.emr``): τ_uni = s · max of the
  agreeing |τ_i| with s = sign(Σ τ_i); M_i = (τ_i ⊙ τ_uni > 0); mask density Σ M_i / numel; the paper's
  whole-model rescaler λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| (groups also report their own local ratio); and the relative
  reconstruction error ‖τ_i − τ̂_i‖ / ‖τ_i‖ of θ̂_i = θ_base + τ̂_i for τ̂_i = τ_uni, M_i ⊙ τ_uni, and
  λ_i M_i ⊙ τ_uni (λ_i the whole-model value). The squared error expands into sums (‖τ_i‖² − 2λ⟨τ_i, M_i τ_uni⟩
  + λ²‖M_i τ_uni‖²), so the whole-model λ_i is applied after the pass without reading anything again;
- merged distance ‖θ_merged − θ_i‖ / ‖τ_i‖: the configured method run (through the registry) on the same
  tensors, θ_merged in the output dtype as the merge writes it. For ``emr``/``emr_rescale`` the "merged" model of task i is its rebuilt θ_base + λ_i M_i ⊙ τ_uni
  with the method's own τ_uni and rescaler variant (``skip`` tensors are kept per task: distance 0).
  A method that needs a whole-model reduction before merging (NAN with ``nan_scope: model``) gets it from a
  first pass over the same rows: the one case where inputs are read twice (``meta.passes`` says 2).

**Sampled mode** reads a seeded random subset of whole rows (first-dimension slices) of each tensor through
``CheckpointSource.read_rows`` (contiguous bands: HTTP range requests on the Hub): ``fraction`` of the rows, at
least 2; tensors of at most ``WHOLE_TENSOR_BYTES`` per input (norms, biases) are read whole. Sums are scaled by
rows / rows read (unbiased totals), so norms, cosines, NAN coefficients, rescalers and errors are estimates.
Sparsifying methods and the trim then act on the sampled rows as if they were the tensor (their thresholds are
estimated from the sample). Each rate gets a 95% confidence interval from the Taylor-linearized variance of a
ratio estimator under stratified cluster sampling: rows are the clusters (elements of a row are correlated, so a
binomial/Wilson interval over elements would be far too narrow), tensors are the strata, with the
finite-population correction (an exact pass has zero width). It is the analytic counterpart of a cluster
bootstrap over rows, deterministic and free. Sampling is the default when the inputs total more than
``SAMPLE_THRESHOLD_BYTES`` (2 GB), at ``DEFAULT_SAMPLE_FRACTION`` (5%) of the rows; ``exact=True`` forces a
full pass. Rows are drawn from a generator seeded by (seed, tensor name): the same seed gives the same rows.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import native
from .architectures import Layers
from .config import MergeConfig
from .engine import Executor, pick_device
from .errors import ConfigError
from .memory import reuse_freed_memory
from .methods.coefficients import nan_coefficients
from .methods.emr import elect, emr_outputs, is_skipped, tau_uni_name
from .methods.registry import MergeMethod, TensorContext
from .methods.selection import Cut, topk_passes
from .methods.task_vectors import sparsified_ranks
from .native import ops
from .native.rng import stable_seed
from .plan import MergePlan, TensorTask, build_plan
from .safetensors_io import DTYPES
from .sources import CheckpointSource, open_sources

SCHEMA_VERSION = 1
SAMPLE_THRESHOLD_BYTES = 2 * 10**9  # above this many input bytes (base + fine-tunes), sampling is the default
DEFAULT_SAMPLE_FRACTION = 0.05
WHOLE_TENSOR_BYTES = 1 << 20  # in sampled mode, tensors of at most 1 MiB per input are read whole
DEFAULT_TRIM_DENSITY = 0.2  # TIES' k = 20%, for methods that have no `density` parameter
Z95 = 1.959963984540054
CHUNK_ELEMENTS = 1 << 22  # statistics run over row chunks of about this many elements per model

_HEAD_HINTS = ("lm_head", "embed_out", "classifier", "score.", "head.")
_EMBED_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "cls_token", "pos_", "shared.weight")

JSON_SCHEMA_DOC = r"""### Analysis JSON (`python -m merging analyze CONFIG --json OUT.json`)

Top level:

| key | meaning |
|---|---|
| `schema_version` | `1` |
| `meta` | how the statistics were gathered (below) |
| `config_yaml` | the merge config, as YAML |
| `model` | the statistics of the whole model (a *stats object*, below) |
| `groups` | one stats object per group, in model order: `embeddings`, `layer 0` … `layer L−1` (per stack in a model with several: `encoder 0` …, `decoder 0` …), `head`, `other` (only groups that have tensors); each also has `name`, `kind` (`embeddings`/`layer`/`head`/`other`), `layer` (the block index or null) and `tensors` (how many) |
| `tensors` | one stats object per analyzed tensor, with `name`, `group` and `shape` |

`meta`: `mode` (`exact` or `sampled`), `sample_fraction` (null when exact; `--sample 1` is an exact pass),
`tensors_sampled` (tensors read by sampled rows; the others, at most `whole_tensor_bytes` per input, are read
whole), `seed` (row sampling), `bytes_read` (tensor bytes read from every source, summed `bytes_read()`),
`bytes_total` (the inputs' stored bytes: one full pass; an exact pass reads tensors above 256K elements up to
three times, for the trim's exact top-k), `seconds`, `passes` (1, or 2 when the method needs a whole-model
reduction first), `device`, `method`, `base_model`, `models` (the fine-tunes' references, in config order: every
per-model list below follows it), `model_labels` (short unique names for charts), `trim` (`density_from`:
`config` or `default`, `default`: 0.2, `densities`: the first tensor's per-model densities), `nan_on` (`weights`
or `task_vector`), `emr_rescalers` (the paper's whole-model λ_i), `method_rescalers` (for `emr`/`emr_rescale`
configs: the method's own λ_i, else null), `interval` (how the 95% intervals are computed; null when exact),
`sample_threshold_bytes`, `whole_tensor_bytes`, `notes`.

A *stats object* (per-model lists have one entry per model; numbers are null where undefined, e.g. a zero norm):

| key | meaning |
|---|---|
| `elements`, `rows`, `rows_read` | the size analyzed and how many first-dimension rows were read |
| `base_norm` | ‖θ_base‖_F |
| `weight_norm` | [‖θ_i‖_F] |
| `task_vector_norm` | [‖τ_i‖_F], τ_i = θ_i − θ_base |
| `relative_task_vector_norm` | [‖τ_i‖ / ‖θ_base‖] |
| `sign_conflict` | a *rate*: among elements where ≥ 2 task vectors are non-zero, the fraction whose non-zero signs differ |
| `trimmed_sign_disagreement` | a *rate*: after the top-`density` trim, the fraction of Σ\|τ̃_i\| whose sign is not the elected sign(Σ τ̃_i) |
| `cosine_similarity` | N×N matrix of cos(τ_i, τ_j) |
| `nan_coefficients` | [α_i], α_i ∝ 1/‖x_i‖ over this tensor/group/model, summing to 1 |
| `emr.mask_density` | [*rate*]: Σ M_i / elements |
| `emr.rescaler` | [*rate*-shaped ratio]: Σ\|τ_i\| / Σ\|M_i ⊙ τ_uni\| over this tensor/group (at `model`: the paper's λ_i) |
| `emr.reconstruction_error` | `unified`, `masked`, `masked_rescaled`: [‖τ_i − τ̂_i‖ / ‖τ_i‖] for τ̂_i = τ_uni, M_i ⊙ τ_uni, λ_i M_i ⊙ τ_uni (whole-model λ_i) |
| `merged_distance` | [‖θ_merged − θ_i‖ / ‖τ_i‖] for the configured method (for EMR methods, task i's rebuilt model) |

A *rate* is `{"rate": r, "ci95": [low, high]}`; `ci95` is null in exact mode. In sampled mode it is a 95%
interval from the linearized variance of a ratio estimator with rows as clusters and tensors as strata.
Sampled totals are scaled by rows / rows read.
"""


# --- ratio estimates with cluster-sampling intervals -----------------------------------------------------------

@dataclass
class RatioStrata:
    """Sample moments of k ratios R = Σy / Σx over the rows (clusters) read of each tensor (stratum).

    Row arrays: ``rows`` N_t and ``read`` n_t, shape (T,); moment sums Σy, Σx, Σy², Σx², Σxy over the rows read,
    shape (T, k). Several tensors are combined by concatenating their strata.
    """

    rows: np.ndarray
    read: np.ndarray
    sy: np.ndarray
    sx: np.ndarray
    syy: np.ndarray
    sxx: np.ndarray
    sxy: np.ndarray

    @staticmethod
    def concat(parts: list[RatioStrata]) -> RatioStrata:
        return RatioStrata(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                             ("rows", "read", "sy", "sx", "syy", "sxx", "sxy")))

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Estimated population totals (Ŷ, X̂): each tensor's sums scaled by N_t / n_t."""
        w = (self.rows / np.maximum(self.read, 1))[:, None]
        return (w * self.sy).sum(axis=0), (w * self.sx).sum(axis=0)

    def estimate(self) -> tuple[np.ndarray, np.ndarray]:
        """(R̂, standard error) per ratio; R̂ = Ŷ / X̂ (NaN where X̂ = 0).

        Var(R̂) ≈ Var(Ŷ − R X̂) / X̂², with Var = Σ_t N_t² (1 − n_t/N_t) s²_t / n_t and s²_t the sample variance
        over the rows of tensor t of z_r = y_r − R x_r (Taylor linearization; rows are clusters).
        """
        y_total, x_total = self.totals()
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(x_total > 0, y_total / np.where(x_total > 0, x_total, 1), np.nan)
        r = np.nan_to_num(ratio)[None, :]
        sz = self.sy - r * self.sx
        szz = self.syy - 2 * r * self.sxy + r * r * self.sxx
        n = self.read[:, None]
        big_n = self.rows[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            s2 = np.where(n > 1, np.maximum(szz - sz * sz / np.maximum(n, 1), 0) / np.maximum(n - 1, 1), 0.0)
            var = (big_n * big_n * (1 - n / np.maximum(big_n, 1)) * s2 / np.maximum(n, 1)).sum(axis=0)
            se = np.where(x_total > 0, np.sqrt(np.maximum(var, 0)) / np.where(x_total > 0, x_total, 1), np.nan)
        return ratio, se


class _Moments:
    """Accumulates one tensor's per-row moment sums chunk by chunk, then becomes a one-stratum RatioStrata."""

    def __init__(self, rows: int, read: int, k: int) -> None:
        self.rows, self.read = rows, read
        self.sums = np.zeros((5, k))

    def add(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """``y``, ``x``: per-row values of shape (k, r) (or (r,) when x is shared by every ratio)."""
        y = y.to(torch.float64)
        x = x.to(torch.float64).expand_as(y)
        parts = torch.stack([y.sum(-1), x.sum(-1), (y * y).sum(-1), (x * x).sum(-1), (x * y).sum(-1)])
        self.sums += parts.cpu().numpy().reshape(5, -1)

    def strata(self) -> RatioStrata:
        return RatioStrata(np.array([float(self.rows)]), np.array([float(self.read)]),
                           *(self.sums[i][None, :].copy() for i in range(5)))


# --- per-tensor sums ---------------------------------------------------------------------------------------------

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
    emr_tau_sq: np.ndarray  # (M,) ‖τ_i‖² over the tensors EMR merges (all but `skip` ones)
    dist_sq: np.ndarray | None = None  # (M,) ‖θ_merged − θ_i‖² (non-EMR methods)
    # EMR methods' own τ_uni: (7, M): Σ|τ_i|, Σ|M'_i τ'_uni|, the same divided by numel (tensor_mean), ⟨τ_i, M' τ'⟩,
    # ‖M' τ'‖², ‖τ_i‖² — over the tensors the method merges (distance 0 elsewhere).
    method_emr: np.ndarray | None = None

    @staticmethod
    def add(parts: list[TensorSums]) -> TensorSums:
        def total(attr):
            values = [getattr(p, attr) for p in parts]
            return None if any(v is None for v in values) else sum(values[1:], values[0])

        return TensorSums(
            elements=sum(p.elements for p in parts), rows=sum(p.rows for p in parts),
            rows_read=sum(p.rows_read for p in parts), base_sq=total("base_sq"), weight_sq=total("weight_sq"),
            gram=total("gram"), conflict=RatioStrata.concat([p.conflict for p in parts]),
            trimmed=RatioStrata.concat([p.trimmed for p in parts]),
            mask=RatioStrata.concat([p.mask for p in parts]), rescale=RatioStrata.concat([p.rescale for p in parts]),
            emr_dot=total("emr_dot"), uni_sq=total("uni_sq"), emr_tau_sq=total("emr_tau_sq"),
            dist_sq=total("dist_sq"), method_emr=total("method_emr"))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor as (rows, columns): its first dimension are the rows (a scalar is one row of one)."""
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(t.shape[0], -1)


class _TopK:
    """Chunk by chunk, the exact top-k mask of one task vector: |τ| above the k-th largest value, plus the first
    tied entries in flat order until exactly k are kept (as ``task_vectors.top_k_mask``)."""

    def __init__(self, magnitude: torch.Tensor, density: float) -> None:
        n = magnitude.numel()
        self.all_ties = False  # a whole tensor's cut keeps its ties by count (ties_left), never all of them
        self.all = density >= 1
        self.none = density <= 0 or n == 0
        if self.all or self.none:
            return
        k = max(1, int(density * n))
        flat = magnitude.reshape(-1)
        if k >= n:
            self.all = True
            return
        self.threshold = flat.kthvalue(n - k + 1).values
        self.ties_left = k - int((flat > self.threshold).sum())

    @classmethod
    def from_rule(cls, threshold: float, ties: int) -> _TopK:
        """The trim of one row band of a tensor, from its exact cut (``Cut.band_rule``): magnitudes above
        ``threshold``, and of those equal to it all (ties = -1), none (0) or the first ``ties``."""
        top = cls.__new__(cls)
        top.all = top.none = False
        top.threshold = torch.tensor(threshold)
        top.all_ties, top.ties_left = ties < 0, max(ties, 0)
        return top

    def rule(self) -> tuple[float, int]:
        """The same trim as (threshold, ties) for the fused kernel: ties -1 keeps every element equal to the
        threshold, 0 none, n the first n in flat order."""
        if self.all:
            return -math.inf, -1
        if self.none:
            return math.inf, 0
        if self.all_ties:
            return float(self.threshold), -1
        return float(self.threshold), self.ties_left

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        if self.all:
            return torch.ones_like(magnitude, dtype=torch.bool)
        if self.none:
            return torch.zeros_like(magnitude, dtype=torch.bool)
        if self.all_ties:
            return magnitude >= self.threshold
        keep = magnitude > self.threshold
        if self.ties_left > 0:
            tied = (magnitude.reshape(-1) == self.threshold).nonzero().reshape(-1)[: self.ties_left]
            keep.reshape(-1)[tied] = True
            self.ties_left -= tied.numel()
        return keep


def tensor_sums(base: torch.Tensor, models: list[torch.Tensor], *, rows: int | None = None,
                trim_density: list[float] | None = None, trim_rules: list[tuple[float, int]] | None = None,
                merged: torch.Tensor | None = None, method_tau_uni: torch.Tensor | None = None,
                emr_merged: bool = True, method_emr: bool = False, numel: int | None = None) -> TensorSums:
    """The sums of one tensor from float32 ``base`` and ``models`` (the whole tensor, or the rows read of it).

    ``rows``: the tensor's full row count (default: the rows given, i.e. an exact pass). ``trim_density``: per
    model, for the TIES trim; ``trim_rules`` instead, for one row band of a tensor: per model its exact cut
    (threshold, ties) from ``Cut.band_rule``. ``numel``: the whole tensor's size when this is a band of it. ``merged``: the configured method's result on the same rows (for the distance).
    ``method_tau_uni``: an EMR method's own τ_uni; ``method_emr`` marks an EMR method (then ``method_tau_uni`` None
    means a ``skip`` tensor, kept per task). ``emr_merged``: False for tensors EMR does not merge (``skip``).

    The work runs over chunks of rows, the task vectors stacked row-first (rows, models, columns) so that every
    inner product is a batched matrix product; sums are taken per row in float32 (a row is at most a few thousand
    elements) and over rows in float64.
    """
    n_models = len(models)
    b = _as_rows(base)
    ms = [_as_rows(m) for m in models]
    read, cols = b.shape
    rows = read if rows is None else rows
    scale = rows / read if read else 0.0
    densities = trim_density or [DEFAULT_TRIM_DENSITY] * n_models
    if trim_rules is not None:
        topk = [_TopK.from_rule(threshold, ties) for threshold, ties in trim_rules]
    else:
        topk = [_TopK((m - b).abs_(), d) for m, d in zip(ms, densities)]
    uni_m = _as_rows(method_tau_uni) if method_tau_uni is not None else None
    merged_rows = _as_rows(merged) if merged is not None else None

    def over_rows(per_row: torch.Tensor) -> torch.Tensor:
        return per_row.to(torch.float64).sum(dim=0).cpu()

    conflict, trimmed = _Moments(rows, read, 1), _Moments(rows, read, 1)
    mask, rescale = _Moments(rows, read, n_models), _Moments(rows, read, n_models)
    base_sq = torch.zeros((), dtype=torch.float64)
    weight_sq = torch.zeros(n_models, dtype=torch.float64)
    gram = torch.zeros(n_models, n_models, dtype=torch.float64)
    emr_dot = torch.zeros(3, n_models, dtype=torch.float64)
    uni_sq = torch.zeros((), dtype=torch.float64)
    dist_sq = torch.zeros(n_models, dtype=torch.float64)
    own = torch.zeros(7, n_models, dtype=torch.float64)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    fused = native.usable(b.device, b, *ms) and read > 0 and cols > 0 and n_models <= native.MAX_INPUTS
    for r0 in range(0, read, read if fused else step):  # the fused kernel takes every row at once
        r1 = read if fused else min(read, r0 + step)
        if fused:
            q = ops.row_sums(b, ms, [top.rule() for top in topk], emr_merged, merged_rows, uni_m)
        else:
            q = _row_sums_torch(b[r0:r1], [m[r0:r1] for m in ms], topk, emr_merged,
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
        if uni_m is not None:
            numel = numel or rows * cols
            abs_total, abs_masked_total = over_rows(q["abs"]), over_rows(q["own_abs_masked"])
            own += torch.stack([abs_total, abs_masked_total, abs_total / numel, abs_masked_total / numel,
                                over_rows(q["own_masked_dot"]), over_rows(q["own_masked_sq"]),
                                over_rows(q["gram"].diagonal(dim1=1, dim2=2))])
    emr_tau_sq = gram.diagonal().clone() if emr_merged else torch.zeros(n_models, dtype=torch.float64)
    return TensorSums(
        elements=rows * cols, rows=rows, rows_read=read, base_sq=float(base_sq) * scale,
        weight_sq=weight_sq.numpy() * scale, gram=gram.numpy() * scale, conflict=conflict.strata(),
        trimmed=trimmed.strata(), mask=mask.strata(), rescale=rescale.strata(),
        emr_dot=emr_dot.numpy() * scale, uni_sq=float(uni_sq) * scale, emr_tau_sq=emr_tau_sq.numpy() * scale,
        dist_sq=dist_sq.numpy() * scale if merged is not None else None,
        method_emr=own.numpy() * scale if method_emr else None)


def _row_sums_torch(bb: torch.Tensor, ms: list[torch.Tensor], topk: list[_TopK], emr_merged: bool,
                    merged: torch.Tensor | None, uni_m: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The per-row sums of a chunk of rows (``native.ops.row_sums`` computes the same in one fused pass), with the
    task vectors stacked row-first (rows, models, columns) so that every inner product is a batched product."""
    n_models = len(ms)
    tau = torch.stack([m - bb for m in ms], dim=1)  # (r, M, C)
    q = {"base_sq": bb.square().sum(dim=-1), "weight_sq": torch.stack([m.square().sum(dim=-1) for m in ms], dim=1)}
    q["gram"] = torch.bmm(tau, tau.transpose(1, 2))  # (r, M, M)
    abs_tau = tau.abs()
    q["abs"] = abs_tau.sum(dim=-1)  # (r, M) Σ|τ_i| per row
    # sign conflicts: ≥ 2 non-zero entries, and both signs present among them
    q["both"] = ((tau > 0).any(dim=1) & (tau < 0).any(dim=1)).sum(dim=-1)
    q["eligible"] = ((tau != 0).sum(dim=1) >= 2).sum(dim=-1)
    # TIES trim, elected sign of the trimmed sum (0 counts as +), |τ̃| mass against it
    kept = torch.stack([tau[:, i] * topk[i].mask(abs_tau[:, i]) for i in range(n_models)], dim=1)
    elected = torch.where(kept.sum(dim=1) >= 0, 1.0, -1.0).unsqueeze(1)
    q["mass"] = kept.abs().sum(dim=(1, 2))
    q["against"] = kept.mul_(elected).neg_().clamp_min_(0).sum(dim=(1, 2))  # |τ̃_i| where sign(τ̃_i) = −s
    del kept, elected
    # EMR's election, masks and the sums behind its rescalers and reconstruction errors
    if emr_merged:
        uni = elect(tau.transpose(0, 1))  # (r, C): EMR's τ_uni, s · max of the agreeing |τ_i|
        q["count"], q["abs_masked"], q["masked_sq"], q["dot"], q["masked_dot"] = _masked_sums(tau, uni,
                                                                                               torch.ones_like(uni))
        q["uni_sq"] = uni.square().sum(dim=-1)
    if merged is not None:
        q["dist"] = ((merged - bb).unsqueeze(1) - tau).square_().sum(dim=-1)
    if uni_m is not None:
        _, q["own_abs_masked"], q["own_masked_sq"], _, q["own_masked_dot"] = _masked_sums(tau, uni_m,
                                                                                          torch.ones_like(uni_m))
    return q


def _masked_sums(tau: torch.Tensor, uni: torch.Tensor, ones: torch.Tensor):
    """Per row and model, for M_i = (τ_i ⊙ τ_uni > 0): Σ M_i, Σ|M_i τ_uni|, ‖M_i τ_uni‖², ⟨τ_i, τ_uni⟩ and
    ⟨τ_i, M_i τ_uni⟩ (= Σ max(τ_i τ_uni, 0)); each (r, M). The three masked sums are one batched product."""
    product = tau * uni.unsqueeze(1)  # (r, M, C)
    dot = product.sum(dim=-1)
    masks = (product > 0).to(tau.dtype)
    features = torch.stack([ones, uni.abs(), uni.square()], dim=-1)  # (r, C, 3)
    masked = torch.bmm(masks, features)  # (r, M, 3)
    masked_dot = product.clamp_min_(0).sum(dim=-1)
    return masked[..., 0], masked[..., 1], masked[..., 2], dot, masked_dot


# --- from sums to statistics -------------------------------------------------------------------------------------

def _num(x: float | np.floating | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _nums(values) -> list[float | None]:
    return [_num(v) for v in np.asarray(values, dtype=float).reshape(-1)]


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _rates(strata: RatioStrata, sampled: bool, clip: bool = True) -> list[dict]:
    ratio, se = strata.estimate()
    out = []
    for r, s in zip(ratio, se):
        ci = None
        if sampled and math.isfinite(r) and math.isfinite(s):
            low, high = r - Z95 * s, r + Z95 * s
            ci = [max(0.0, float(low)), min(1.0, float(high)) if clip else float(high)]
        out.append({"rate": _num(r), "ci95": ci})
    return out


@dataclass
class StatsContext:
    """What turning sums into statistics needs beyond the sums: whole-model values known after the pass."""

    sampled: bool  # rates get 95% intervals
    nan_on: str = "weights"  # NAN's α from ‖θ_i‖ ("weights") or ‖τ_i‖ ("task_vector")
    emr_rescalers: np.ndarray | None = None  # the paper's whole-model λ_i
    method_rescalers: np.ndarray | None = None  # an EMR method's own λ_i


def _errors(tau_sq: np.ndarray, dot: np.ndarray, approx_sq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """‖τ − c·a‖ / ‖τ‖ from ‖τ‖², ⟨τ, a⟩, ‖a‖² and the factor c: √(‖τ‖² − 2c⟨τ,a⟩ + c²‖a‖²) / ‖τ‖."""
    sq = np.maximum(tau_sq - 2 * scale * dot + scale * scale * approx_sq, 0)
    return _safe_div(np.sqrt(sq), np.sqrt(tau_sq))


def derive(sums: TensorSums, ctx: StatsContext) -> dict[str, Any]:
    """The statistics of one tensor, group or the whole model from its sums (see ``JSON_SCHEMA_DOC``)."""
    tau_sq = np.maximum(np.diagonal(sums.gram), 0)
    tau_norm = np.sqrt(tau_sq)
    base_norm = math.sqrt(max(sums.base_sq, 0))
    cosine = _safe_div(sums.gram, np.sqrt(np.outer(tau_sq, tau_sq)))
    norms_for_nan = np.sqrt(np.maximum(sums.weight_sq, 0)) if ctx.nan_on == "weights" else tau_norm
    alphas = nan_coefficients(torch.tensor(norms_for_nan, dtype=torch.float64))
    lam = ctx.emr_rescalers if ctx.emr_rescalers is not None else np.ones_like(tau_sq)
    ones = np.ones_like(tau_sq)
    emr = {
        "mask_density": _rates(sums.mask, ctx.sampled),
        "rescaler": _rates(sums.rescale, ctx.sampled, clip=False),
        "reconstruction_error": {
            "unified": _nums(_errors(sums.emr_tau_sq, sums.emr_dot[0], np.full_like(tau_sq, sums.uni_sq), ones)),
            "masked": _nums(_errors(sums.emr_tau_sq, sums.emr_dot[1], sums.emr_dot[2], ones)),
            "masked_rescaled": _nums(_errors(sums.emr_tau_sq, sums.emr_dot[1], sums.emr_dot[2], lam)),
        },
    }
    if sums.method_emr is not None and ctx.method_rescalers is not None:
        own = sums.method_emr
        # skip tensors are kept per task: they add ‖τ_i‖² to the denominator and nothing to the error
        err_sq = np.maximum(own[6] - 2 * ctx.method_rescalers * own[4] + ctx.method_rescalers ** 2 * own[5], 0)
        distance = _safe_div(np.sqrt(err_sq), tau_norm)
    elif sums.dist_sq is not None:
        distance = _safe_div(np.sqrt(np.maximum(sums.dist_sq, 0)), tau_norm)
    else:
        distance = None
    return {
        "elements": int(sums.elements), "rows": int(sums.rows), "rows_read": int(sums.rows_read),
        "base_norm": _num(base_norm),
        "weight_norm": _nums(np.sqrt(np.maximum(sums.weight_sq, 0))),
        "task_vector_norm": _nums(tau_norm),
        "relative_task_vector_norm": _nums(tau_norm / base_norm if base_norm > 0 else np.full_like(tau_norm, np.nan)),
        "sign_conflict": _rates(sums.conflict, ctx.sampled)[0],
        "trimmed_sign_disagreement": _rates(sums.trimmed, ctx.sampled)[0],
        "cosine_similarity": [_nums(row) for row in cosine],
        "nan_coefficients": [float(a) for a in alphas],
        "emr": emr,
        "merged_distance": _nums(distance) if distance is not None else None,
    }


# --- groups --------------------------------------------------------------------------------------------------------

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


def _group_order(kind: str, layer: int | None, stack: int = 0) -> tuple[int, int, int]:
    return {"embeddings": (0, 0, 0), "layer": (1, stack, layer or 0), "head": (2, 0, 0), "other": (3, 0, 0)}[kind]


def model_labels(models: list[str]) -> list[str]:
    """Short unique names for references: the last path component, or the whole reference when that repeats."""
    short = [os.path.basename(os.path.normpath(m)) or m for m in models]
    return [s if short.count(s) == 1 else m for s, m in zip(short, models)]


# --- the pass -------------------------------------------------------------------------------------------------------

class _AnalysisExecutor(Executor):
    """The engine's executor (prefetch, progress, cancel), reading the sampled rows of tasks that have them."""

    def __init__(self, *args, sampled_rows: dict[str, list[int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampled_rows = sampled_rows

    def bands(self, task: TensorTask, elementwise: bool):
        """Sampled tensors are one unit (their rows are read at once); the rest go by the engine's row bands. A
        tensor too small to split is still one band, unless tiny: its trim then takes the statistics passes' exact
        top-k (selection) instead of a kthvalue over the whole tensor."""
        if task.name in self.sampled_rows:
            return [None]
        bands = super().bands(task, elementwise)
        shape = task.spec.shape
        if (bands == [None] and elementwise and task.shared_rows is None and len(shape) >= 1
                and task.spec.numel > WHOLE_TENSOR_BYTES // 4):
            return [(0, shape[0])]
        return bands

    def read_inputs(self, task: TensorTask, band: tuple[int, int] | None = None):
        rows = self.sampled_rows.get(task.name)
        if rows is None:
            return super().read_inputs(task, band)
        base = self.sources[task.base.model].read_rows(task.base.name, rows)
        models = [self.sources[r.model].read_rows(r.name, rows) for r in task.inputs]
        return base, models

    def inputs(self, task: TensorTask, base: torch.Tensor, models: list[torch.Tensor]):
        """Float32 compute tensors: shared (vocabulary) rows only for whole reads; samples already are."""
        keep = None if task.name in self.sampled_rows else task.shared_rows
        return self.to_compute(base, keep), [self.to_compute(m, keep) for m in models]


def _is_emr_method(method: MergeMethod) -> bool:
    return method.outputs is emr_outputs


def _stats_in_memory(method: MergeMethod, base, models, params, ctx: TensorContext):
    """A method's per-tensor statistics passes run on tensors already in memory, as the engine runs them on one
    band covering the whole tensor (``needed``/``only_if`` skips and ``sample_stride`` subsampling included)."""
    stats = None
    for stats_pass in method.stats:
        needed, only_if = getattr(stats_pass, "needed", None), getattr(stats_pass, "only_if", None)
        if (needed is not None and not needed(params)) or (only_if is not None and not only_if(stats)):
            continue
        b, ms = base, models
        stride = getattr(stats_pass, "sample_stride", 1)
        if stride > 1:
            b = base.reshape(-1)[::stride] if base is not None else None
            ms = [m.reshape(-1)[::stride] for m in models]
        ctx.stats = stats
        part = stats_pass.collect(b, ms, params, ctx)
        combined = {k: torch.cat([v]) if k in stats_pass.concat else v for k, v in part.items()}
        stats = stats_pass.finish(combined, params, ctx) if stats_pass.finish else combined
    ctx.stats = stats
    return stats


def _merged_as_written(executor: Executor, task: TensorTask, base, inputs, floats: Callable[[], tuple],
                       ctx: TensorContext):
    """The configured method's result on these rows, in the output dtype as the merge writes it (the fused kernel
    on the stored inputs where there is one, else ``fn`` on ``floats()``, the float32 inputs), or its dict of
    outputs."""
    done = executor.try_native(task, base, inputs, ctx)
    if done is not None:
        return done[0]
    b, ms = floats()
    result = executor.plan.method.fn(b, ms, task.params, ctx)
    return result if isinstance(result, dict) else result.to(DTYPES[task.spec.dtype])


@dataclass
class _Part:
    task: TensorTask
    sums: TensorSums


# The trim's exact top-k cuts, per model, gathered over a tensor's bands like a sparsifying method's.
TRIM_PASSES = topk_passes(sparsified_ranks("magnitude"), key="trim", needed=lambda p: any(d < 1 for d in p["density"]))


def _trim_cuts(executor: Executor, task: TensorTask, reduced, densities: list[float], method: MergeMethod,
               stats, first) -> list[list[Cut]] | None:
    """The trim's cuts for one tensor; TIES' own cuts when the method is TIES (the same ranks: no extra read).
    None means nothing is trimmed (every density is 1)."""
    if not any(d < 1 for d in densities):
        return None
    if method.name == "ties" and stats and "cuts" in stats:
        return stats["cuts"]
    return executor.tensor_stats(task, reduced, passes=TRIM_PASSES, params={"density": densities},
                                 first=first)["trim"]


def _band_rule(cuts: list[Cut] | None, ctx: TensorContext) -> tuple[float, int]:
    return (-math.inf, -1) if cuts is None else cuts[0].band_rule(ctx)


def _needs_reduction(plan: MergePlan) -> bool:
    method = plan.method
    if method.reduce is None:
        return False
    needed = method.reduce_needed(plan) if method.reduce_needed is not None else True  # also validates (EMR)
    return bool(needed) and not _is_emr_method(method)


def _choose_rows(task: TensorTask, spec_bytes: int, fraction: float, seed: int, whole_bytes: int) -> list[int] | None:
    """The sampled rows of one tensor, sorted, or None to read it whole."""
    shape = task.spec.shape
    n_rows = task.shared_rows or (shape[0] if shape else 1)
    if not shape or spec_bytes <= whole_bytes or n_rows <= 2:
        return None
    k = min(n_rows, max(2, round(fraction * n_rows)))
    if k >= n_rows:
        return None
    gen = torch.Generator().manual_seed(stable_seed(seed, "analysis:" + task.name))
    return sorted(torch.randperm(n_rows, generator=gen)[:k].tolist())


def analyze(config: MergeConfig, *, exact: bool = False, sample: float | None = None, seed: int = 0,
            device: str = "cpu", progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
            resolver=None, allow_pickle: bool = False, sample_threshold_bytes: int = SAMPLE_THRESHOLD_BYTES,
            whole_tensor_bytes: int = WHOLE_TENSOR_BYTES) -> dict[str, Any]:
    """The diagnostics of ``config`` as a JSON-ready dict (schema: ``JSON_SCHEMA_DOC``).

    ``exact`` forces a full pass; ``sample`` (0 < fraction ≤ 1) samples that fraction of rows; neither: exact up to
    ``sample_threshold_bytes`` of input, sampled at ``DEFAULT_SAMPLE_FRACTION`` above.
    """
    if exact and sample is not None:
        raise ConfigError("analysis: choose either an exact pass or a sample fraction, not both")
    if sample is not None and not 0 < sample <= 1:
        raise ConfigError(f"analysis: the sample fraction must be in (0, 1], got {sample}")
    started = time.monotonic()
    reuse_freed_memory()  # as a merge does: keep freed chunk buffers instead of re-mapping them every tensor
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        return _analyze(config, sources, started, exact, sample, seed, device, progress, cancel,
                        sample_threshold_bytes, whole_tensor_bytes)
    finally:
        for src in sources.values():
            src.close()


def _analyze(config: MergeConfig, sources: dict[str, CheckpointSource], started: float, exact: bool,
             sample: float | None, seed: int, device: str, progress, cancel, threshold: int,
             whole_bytes: int) -> dict[str, Any]:
    plan = build_plan(config, sources)
    plan.require_compatible()
    method = plan.method
    if not config.base_model:
        raise ConfigError("config: the analysis compares task vectors τ_i = θ_i − θ_base and needs a `base_model`")
    tasks = [t for t in plan.tasks if not t.copy and t.base is not None and t.inputs]
    notes = list(plan.report.notes)
    skipped = [t.name for t in plan.tasks if not t.copy and (t.base is None or not t.inputs)]
    if skipped:
        notes.append(f"{len(skipped)} tensors have no base or no inputs in their slice and are not analyzed")
    if not tasks:
        raise ConfigError(f"config: nothing to analyze: merge_method {method.name!r} merges no tensor from a base "
                          "and fine-tunes")
    models = list(tasks[0].model_names)
    if any(list(t.model_names) != models for t in tasks):
        raise ConfigError("config: the analysis needs the same models, in the same order, for every tensor "
                          "(slices with different sources are not supported)")

    def stored_bytes(task: TensorTask) -> int:
        refs = [task.base, *task.inputs]
        return sum(sources[r.model].specs()[r.name].nbytes for r in refs)

    bytes_total = sum(stored_bytes(t) for t in tasks)
    if exact:
        fraction = 1.0
    elif sample is not None:
        fraction = float(sample)
    else:
        fraction = DEFAULT_SAMPLE_FRACTION if bytes_total > threshold else 1.0
    sampled = fraction < 1.0
    sampled_rows: dict[str, list[int]] = {}
    if sampled:
        for t in tasks:
            rows = _choose_rows(t, sources[t.base.model].specs()[t.base.name].nbytes, fraction, seed, whole_bytes)
            if rows is not None:
                sampled_rows[t.name] = rows
    executor = _AnalysisExecutor(plan, sources, pick_device(device), progress, cancel, sampled_rows=sampled_rows)
    read_before = sum(src.bytes_read() for src in sources.values())

    emr_method = _is_emr_method(method)
    reduced = None
    passes = 1
    if _needs_reduction(plan):
        passes = 2
        total = None
        for task, _, base, inputs in executor.stream(tasks, "reduce"):
            b, ms = executor.inputs(task, base, inputs)
            ctx = TensorContext(task.name, config.seed, None, task.model_names, shape=tuple(b.shape))
            part = method.reduce(b, ms, task.params, ctx).to(torch.float64).cpu()
            rows = task.shared_rows or (task.spec.shape[0] if task.spec.shape else 1)
            part = part * (rows / (b.shape[0] if b.dim() else 1))  # sampled rows: scale to the whole tensor
            total = part if total is None else total + part
        reduced = total

    per_tensor: list[tuple[TensorTask, TensorSums]] = []
    has_density = any(p.name == "density" for p in method.params)
    several_outputs = False
    parts: list[TensorSums] = []
    stats = trim = None
    # Exact passes go band by band, like a merge: whole-tensor quantities (the trim's and the method's top-k cuts)
    # come from the engine's statistics passes first, so no whole tensor is ever held.
    for task, band, base, inputs in executor.stream(tasks, "analyze", banded=True):
        # A band the fused kernels take as stored needs no float32 copies (they cost a quarter of the pass).
        as_stored = band is not None and not emr_method and executor.native_ready(task, base, inputs)
        b, ms = (base, inputs) if as_stored else executor.inputs(task, base, inputs)
        rows = task.shared_rows or (task.spec.shape[0] if task.spec.shape else 1)
        densities = list(task.params["density"]) if has_density else [DEFAULT_TRIM_DENSITY] * len(ms)
        if band is None or band[0] == 0:
            if parts:
                per_tensor.append((parts[0].task, TensorSums.add([p.sums for p in parts])))
            parts = []
            if band is not None:
                first = (band, (base, inputs))  # the band in hand: the passes need not read it again
                stats = executor.tensor_stats(task, reduced, first=first) if method.stats and not emr_method else None
                trim = _trim_cuts(executor, task, reduced, densities, method, stats, first)
        shape = tuple(task.spec.shape) if band is not None else tuple(b.shape)
        ctx = TensorContext(task.name, config.seed, reduced, task.model_names, band=band, shape=shape,
                            stats=stats if band is not None else None)
        emr_merged = not (emr_method and is_skipped(task.name, task.params["skip"]))
        merged = method_uni = None
        if emr_method:
            if emr_merged:
                method_uni = method.fn(b, ms, task.params, ctx)[tau_uni_name(task.name)]
        else:
            if method.stats and band is None:
                _stats_in_memory(method, b, ms, task.params, ctx)
            floats = (lambda: executor.inputs(task, base, inputs)) if as_stored else (lambda: (b, ms))
            merged = _merged_as_written(executor, task, base, inputs, floats, ctx)
            if isinstance(merged, dict):  # a method with several outputs per tensor: no single merged weight
                merged, several_outputs = None, True
        rules = None if band is None else [_band_rule(trim[i] if trim else None, ctx) for i in range(len(ms))]
        sums = tensor_sums(b, ms, rows=rows if band is None else b.shape[0], trim_density=densities,
                           trim_rules=rules, merged=merged, method_tau_uni=method_uni, emr_merged=emr_merged,
                           method_emr=emr_method, numel=task.spec.numel if band is not None else None)
        parts.append(_Part(task, sums))
    if parts:
        per_tensor.append((parts[0].task, TensorSums.add([p.sums for p in parts])))
    bytes_read = sum(src.bytes_read() for src in sources.values()) - read_before
    if several_outputs:
        notes.append(f"{method.name} writes several tensors per input tensor: no merged-distance statistics")

    whole = TensorSums.add([s for _, s in per_tensor])
    emr_rescalers, _ = whole.rescale.estimate()
    emr_rescalers = np.where(np.isfinite(emr_rescalers), emr_rescalers, 1.0)  # empty mask: λ = 1, as the method
    method_rescalers = None
    if emr_method:
        own = whole.method_emr
        variant = tasks[0].params.get("rescaler", "model")
        num, den = (own[2], own[3]) if variant == "tensor_mean" else (own[0], own[1])
        method_rescalers = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
    nan_on = tasks[0].params.get("nan_on") or "weights"
    ctx = StatsContext(sampled, nan_on, emr_rescalers, method_rescalers)

    grouped: dict[str, list[TensorSums]] = {}
    kinds: dict[str, tuple[str, int | None]] = {}
    tensors_out = []
    layers = Layers.of([task.name for task, _ in per_tensor])
    stack_rank = {label: i for i, label in enumerate(dict.fromkeys(layers.labels[s] for s in layers.counts))}
    for task, sums in per_tensor:
        group, kind, layer = group_of(task.name, layers)
        grouped.setdefault(group, []).append(sums)
        kinds[group] = (kind, layer)
        tensors_out.append({"name": task.name, "group": group, "shape": list(task.spec.shape), **derive(sums, ctx)})
    groups_out = []
    for group in sorted(grouped, key=lambda g: _group_order(*kinds[g], stack_rank.get(g.rsplit(" ", 1)[0], 0))):
        kind, layer = kinds[group]
        groups_out.append({"name": group, "kind": kind, "layer": layer, "tensors": len(grouped[group]),
                           **derive(TensorSums.add(grouped[group]), ctx)})
    first_densities = list(tasks[0].params["density"]) if has_density else [DEFAULT_TRIM_DENSITY] * len(models)
    meta = {
        "mode": "sampled" if sampled else "exact",
        "sample_fraction": fraction if sampled else None,
        "tensors_sampled": len(sampled_rows),
        "seed": seed,
        "bytes_read": int(bytes_read),
        "bytes_total": int(bytes_total),
        "seconds": round(time.monotonic() - started, 3),
        "passes": passes,
        "device": str(executor.device),
        "method": method.name,
        "base_model": config.base_model,
        "models": models,
        "model_labels": model_labels(models),
        "trim": {"density_from": "config" if has_density else "default", "default": DEFAULT_TRIM_DENSITY,
                 "densities": first_densities},
        "nan_on": nan_on,
        "emr_rescalers": _nums(emr_rescalers),
        "method_rescalers": _nums(method_rescalers) if method_rescalers is not None else None,
        "interval": "95% Taylor-linearized ratio-estimator interval; rows are clusters, tensors strata, "
                    "finite-population corrected" if sampled else None,
        "sample_threshold_bytes": threshold,
        "whole_tensor_bytes": whole_bytes,
        "notes": notes,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "meta": meta,
        "config_yaml": config.to_yaml(),
        "model": {"name": "model", "kind": "model", "layer": None, "tensors": len(per_tensor), **derive(whole, ctx)},
        "groups": groups_out,
        "tensors": tensors_out,
    }
