"""Task-vector merges that weigh or count the tasks per element: SCE, and RAM / RAM+ (mergekit 0.1.5's semantics).

SCE (Wan et al. 2024, FuseChat, arXiv:2408.07990): Select the elements whose task vectors vary most across the
models, Calculate per-model weights from the task vectors' energy, Erase the entries against the elected sign.
RAM (Reinforced Agent Merging, arXiv:2601.13572): an entry changed by one model only keeps that model's change, an
entry changed by several gets their mean; RAM+ (tensor-local) amplifies the unique entries of models that share
many of theirs.
"""

from __future__ import annotations

import torch

from .registry import MergeMethod, Param, StatsPass, TensorContext, register


def sce_select(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's selection mask over the elements: the ⌊fraction · n⌋ with the largest variance across the models
    (population variance), n the number of elements whose variance is not 0."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask


def sce(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """SCE: τ_i = θ_i − θ_base, each masked by ``sce_select`` when select_topk < 1; weights
    w_i = mean(τ_i²) / Σ_j mean(τ_j²) (uniform when that sum is below 1e-6); the sign s = sign(Σ_i τ_i) (≥ 0 → +);
    θ = θ_base + Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6), m_i = [sign(τ_i) = s]."""
    task_vectors = torch.stack([theta - base for theta in models])
    if params["select_topk"] < 1:
        task_vectors = task_vectors * sce_select(task_vectors, params["select_topk"]).unsqueeze(0)
    elected = (task_vectors.sum(dim=0) >= 0).to(task_vectors.dtype) * 2 - 1
    agree = (task_vectors.sign() == elected).to(task_vectors.dtype)
    energy = task_vectors.square().reshape(len(models), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1.0 / len(models)) if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *([1] * base.dim())) * agree
    return base + (task_vectors * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _ram_parts(base: torch.Tensor, models: list[torch.Tensor], epsilon: float):
    task_vectors = torch.stack([theta - base for theta in models])
    changed = task_vectors.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return task_vectors * changed, changed, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """RAM: with c = #{i : |τ_i| > ε} per element and τ̂_i = τ_i [|τ_i| > ε]:
    θ = θ_base + Σ_i (τ̂_i [c = 1] + τ̂_i [c > 1] / c)."""
    kept, _, counts, shared, unique = _ram_parts(base, models, params["epsilon"])
    return base + (kept * unique + kept * shared / counts.clamp(min=1)).sum(dim=0)


def ram_counts(base: torch.Tensor, models: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Per model, how many of its changed entries it shares with another model, and how many it alone changed
    (2, N), float64: summed over a tensor's bands."""
    _, changed, _, shared, unique = _ram_parts(base, models, epsilon)
    n = len(models)
    return torch.stack([(changed & shared).reshape(n, -1).sum(dim=1), (changed & unique).reshape(n, -1).sum(dim=1)]
                       ).to(torch.float64)


def ramplus(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each model's unique entries scaled by λ_i = 1 + r · clip(ρ_i, 0, α), where
    ρ_i = (its shared changed entries) / max(its unique changed entries, ε), counted over the whole tensor."""
    epsilon = params["epsilon"]
    kept, _, counts, shared, unique = _ram_parts(base, models, epsilon)
    totals = (ctx.stats or {}).get("ram_counts")
    if totals is None:
        totals = ram_counts(base, models, epsilon)
    rho = totals[0] / totals[1].clamp(min=epsilon)
    scale = (1 + params["r"] * rho.clamp(min=0, max=params["alpha"])).to(kept.dtype).view(-1, *([1] * base.dim()))
    return base + (kept * unique * scale + kept * shared / counts.clamp(min=1)).sum(dim=0)


RAM_PAPER = "Reinforced Agent Merging (mergekit's ram; arXiv:2601.13572)"
EPSILON = Param("epsilon", float, 1e-5, "an entry counts as changed by a model when |τ_i| > epsilon", min=0.0)

register(MergeMethod(
    name="sce", fn=sce,
    summary="select the most varying entries, weigh each task vector by its energy, erase entries against the "
            "elected sign",
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging, arXiv:2408.07990)",
    params=(Param("select_topk", float, 1.0, "fraction of the entries (those that vary across models) kept, by "
                  "variance across the models", min=0.0, max=1.0),
            Param("int8_mask", bool, False, "accepted for mergekit compatibility; no effect here")),
    base="required", min_models=1, ignored=("weight",),
))

register(MergeMethod(
    name="ram", fn=ram, summary="an entry changed by one model keeps its change; one changed by several, their mean",
    paper=RAM_PAPER, params=(EPSILON,), base="required", min_models=1, elementwise=True, ignored=("weight",),
))

register(MergeMethod(
    name="ramplus_tl", fn=ramplus,
    summary="RAM, with each model's unique entries amplified by how many of its entries it shares (per tensor)",
    paper=RAM_PAPER,
    params=(Param("r", float, 0.1, "how strongly sharing amplifies a model's unique entries", min=0.0),
            Param("alpha", float, 0.2, "the cap on the shared / unique ratio ρ", min=0.0), EPSILON),
    base="required", min_models=1, elementwise=True, ignored=("weight",),
    stats=(StatsPass(lambda base, models, params, ctx: {"ram_counts": ram_counts(base, models, params["epsilon"])},
                     finish=lambda combined, params, ctx: {**(ctx.stats or {}), **combined}),),
))
