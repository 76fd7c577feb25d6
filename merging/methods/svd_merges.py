"""Merges in the singular bases of the task matrices: TSV-M, Iso-C, Iso-CTS and CART.

Each works per 2-D tensor (a layer matrix) with exact thin SVDs (``lowrank``; on the GPU when the engine runs
there) and streams tensor by tensor like any other method; the tensors that are not matrices follow each paper's
rule (below). With τ_i = θ_i − θ_base (N models) and r = min(m, n) for an m × n matrix:

**TSV-M** (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR,
arXiv:2412.00081, §5, Alg. 1): keep each task's top k = ⌊r/N⌋ singular triplets τ_i ≈ U_i Σ_i V_iᵀ, concatenate
U = [U_1 … U_N], Σ = diag(Σ_1 … Σ_N), V = [V_1 … V_N], decorrelate them by the orthogonal Procrustes solution
U⊥ = polar(U), V⊥ = polar(V), and θ = θ_base + α U⊥ Σ V⊥ᵀ. Non-matrix tensors: θ_base + α · mean_i τ_i (as the
official code and FusionBench).

**Iso-C** (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML, arXiv:2502.04959, Eq. 6): the task-arithmetic sum Δ = Σ_i τ_i = U Σ Vᵀ gets a flat spectrum,
Δ_iso = σ̄ U Vᵀ with σ̄ = mean(Σ) (all r singular values), θ = θ_base + α Δ_iso.

**Iso-CTS** (same paper, §4.2, Alg. 1): the common subspace is the top k_c singular vectors of Δ, k_c = r − N·s
with s = round((r − ⌊f·r⌋)/N) (f = ``common_fraction``, 0.8 in the paper); each task adds its s top singular
vectors of its projection off the common subspace, τ_i − U_c U_cᵀ τ_i; U and V (common and task-specific stacked)
are orthogonalized by polar decomposition and the spectrum flattened to the mean of the stacked singular values:
θ = θ_base + α σ̄ U⊥ V⊥ᵀ. Non-matrix tensors (both Iso methods): θ_base + α · mean_i τ_i (as the official code).

**CART** (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging", arXiv:2412.12153, Eq. 5): centre the
task vectors on the weight average, τ̄_i = θ_i − θ_avg with θ_avg = mean_i θ_i, keep each one's best rank-k
approximation (k = max(1, ⌊ρ·r⌋), ρ = ``rank_fraction``), θ = θ_avg + λ Σ_i LR_k(τ̄_i). A full-rank sum is zero, so
non-matrix tensors are the weight average.
"""

from __future__ import annotations

import torch

from .lines import LINES_PARAMS, lines_scale, make_reduce, needs_reduction, reduce_stats
from .lowrank import is_matrix, low_rank, polar, thin_svd
from .registry import MergeMethod, Param, Preset, TensorContext, register


def _scale(params: dict, ctx: TensorContext, n: int) -> float:
    return params["lambda"] * lines_scale(params, ctx, n)


def tsv_merge_matrix(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M's merged task matrix U⊥ Σ V⊥ᵀ (before α) from the N task matrices."""
    n = len(task_vectors)
    k = min(task_vectors[0].shape) // n
    if k == 0:
        return torch.zeros_like(task_vectors[0])
    us, ss, vhs = [], [], []
    for tau in task_vectors:
        u, s, vh = thin_svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return (polar(torch.cat(us, dim=1)) * torch.cat(ss)) @ polar(torch.cat(vhs, dim=0))


def tsv_m(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """TSV-M: see the module docstring."""
    taus = [theta - base for theta in models]
    merged = tsv_merge_matrix(taus) if is_matrix(base) else sum(taus) / len(taus)
    return base + _scale(params, ctx, len(models)) * merged


def iso_c_matrix(summed: torch.Tensor) -> torch.Tensor:
    """Iso-C's flattened sum σ̄ U Vᵀ of Δ = U Σ Vᵀ."""
    u, s, vh = thin_svd(summed)
    return (u * s.mean()) @ vh


def iso_c(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Iso-C: see the module docstring."""
    taus = [theta - base for theta in models]
    merged = iso_c_matrix(sum(taus)) if is_matrix(base) else sum(taus) / len(taus)
    return base + _scale(params, ctx, len(models)) * merged


def iso_cts_sizes(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(common directions k_c, directions per task s): s = round((r − ⌊f·r⌋)/N), k_c = r − N·s (the official code's
    rounding, so that the task-specific part divides evenly among the tasks)."""
    per_task = round((r - int(r * fraction)) / n)
    return r - n * per_task, per_task


def iso_cts_matrix(task_vectors: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS's merged task matrix σ̄ U⊥ V⊥ᵀ (before α)."""
    n = len(task_vectors)
    common, per_task = iso_cts_sizes(min(task_vectors[0].shape), n, fraction)
    u, s, vh = thin_svd(sum(task_vectors))
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        basis = u[:, :common]
        for tau in task_vectors:
            u_t, s_t, vh_t = thin_svd(tau - basis @ (basis.T @ tau))
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vhs.append(vh_t[:per_task])
    flat = torch.cat(ss).mean()
    return (polar(torch.cat(us, dim=1)) * flat) @ polar(torch.cat(vhs, dim=0))


def iso_cts(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Iso-CTS: see the module docstring."""
    taus = [theta - base for theta in models]
    if is_matrix(base):
        merged = iso_cts_matrix(taus, params["common_fraction"])
    else:
        merged = sum(taus) / len(taus)
    return base + _scale(params, ctx, len(models)) * merged


def cart(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """CART: see the module docstring."""
    average = sum(models) / len(models)
    if not is_matrix(base):
        return average
    k = max(1, int(params["rank_fraction"] * min(base.shape)))
    return average + params["lambda"] * sum(low_rank(theta - average, k) for theta in models)


ALPHA = Param("lambda", float, 1.0, "α: scales the merged task vector before it is added to the base")
SVD_NOTE = "per 2-D tensor with exact SVDs (on the GPU when there is one)"


def register_reduced(name: str, fn, **declared) -> None:
    """Register an SVD-based task-vector method (TSV-M, Iso-C, Iso-CTS): a base and at least one fine-tune, and the
    LiNeS/NAN plug-ins' whole-model reduction over ``fn`` (``merging.methods.lines``)."""
    register(MergeMethod(name=name, fn=fn, base="required", min_models=1, reduce=make_reduce(fn),
                         reduce_needed=needs_reduction, reduce_stats=reduce_stats, **declared))


register_reduced(
    "tsv_m", tsv_m,
    summary="keep each task's top 1/N singular vectors per matrix, decorrelate them (Procrustes), add the result",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR, "
          "arXiv:2412.00081)",
    params=(ALPHA, *LINES_PARAMS),
    presets=(Preset("paper", "α = 1 (Gargiulo et al.: the official code's default)", {"lambda": 1.0}),),
)

register_reduced(
    "iso_c", iso_c,
    summary="task arithmetic's sum with its singular spectrum flattened to the mean (isotropic), per matrix",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
          "Subspaces (ICML, arXiv:2502.04959)",
    params=(ALPHA, *LINES_PARAMS),
    presets=(Preset("paper", "α = 1 (the official config; the paper picks α on validation)", {"lambda": 1.0}),),
)

register_reduced(
    "iso_cts", iso_cts,
    summary="Iso-C on the sum's top subspace plus each task's own directions off it, orthogonalized, flat spectrum",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
          "Subspaces (ICML, arXiv:2502.04959)",
    params=(ALPHA, Param("common_fraction", float, 0.8, "fraction of the rank given to the common subspace",
                         min=0.0, max=1.0), *LINES_PARAMS),
    presets=(Preset("paper", "common subspace 80 %, α = 1 (Marczak et al.; α picked on validation there)",
                    {"common_fraction": 0.8, "lambda": 1.0}),),
)

register(MergeMethod(
    name="cart", fn=cart,
    summary="weight average plus the low-rank parts of the task vectors centred on it, per matrix",
    paper="Choi et al. 2024, Revisiting Weight Averaging for Model Merging (CART, arXiv:2412.12153)",
    params=(Param("lambda", float, 1.0, "scales the sum of the centred low-rank task vectors"),
            Param("rank_fraction", float, 0.08, "fraction of each matrix's rank kept per centred task vector",
                  min=0.0, max=1.0, min_exclusive=True)),
    presets=(Preset("paper", "rank 8 %, λ = 1 (Choi et al.; λ picked on validation there)",
                    {"rank_fraction": 0.08, "lambda": 1.0}),),
    base="required", min_models=1,
))
