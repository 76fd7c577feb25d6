"""PCB-Merging and Consensus merging: per-element weights or masks from how the tasks compete for each parameter.

**PCB-Merging** (Du et al. 2024, "Parameter Competition Balancing for Model Merging", NeurIPS, arXiv:2410.02396,
§3.2, Eqs. 2–6, as its official code computes them). Over the flattened task vectors (the whole model with
``pcb_scope: model``, the paper's; each tensor alone with ``tensor``), per model i of N:

    clip:   |τ_i| clamped to its 0.01 % and 99.99 % order statistics (the official code), τ̂_i = sign(τ_i)·that
    intra:  β_intra,i = exp(N · norm(|τ̂_i|)²)        norm(x) = (x − min x) / (max x − min x) over the vector
    inter:  β_inter,i = tanh(τ_i · Σ_j τ_j)
    β_i = β_intra,i · β_inter,i;  drop: β_i raised to its ⌊(1 − r)·D⌋-th smallest value, then normalized to [0, 1]
            (so all but the top r fraction get 0: ``ratio`` = r)
    θ = θ_base + λ · Σ_i β_i τ̂_i / max(Σ_i β_i, 1e-12)

Every order statistic is the official code's index into the sorted vector (a constant vector, whose min–max
normalization the official code divides by zero, normalizes to 0 here); with ``pcb_scope: model`` they are
exact whole-model thresholds from streaming passes (``global_topk``), so the merge itself runs band by band.

**Consensus merging** (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression", ICML, arXiv:2405.07813, §4, Eqs. 3–5): with the task-arithmetic sum τ_MTL = Σ_t τ_t, each task's
TALL mask m_t = [|τ_t| > λ_t |τ_MTL − τ_t|] marks the entries that matter to it; entries that fewer than k tasks
use ("selfish" k = 1, "catastrophic" k = 0) are removed: θ = θ_base + α · [Σ_t m_t ≥ k] ⊙ τ_MTL. The paper picks
each λ_t from {0.2, …, 0.6} on task t's validation data (0.4 here by default), k = 2 and α on validation.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .global_topk import global_topk_passes
from .lines import LINES_PARAMS, lines_scale, make_reduce, needs_reduction, reduce_stats
from .registry import MergeMethod, Param, Preset, TensorContext, register

CLIP = 0.0001  # the official code's outlier clip, each side


def _ascending(values: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th smallest (0-based) of a flat tensor, by selection."""
    return torch.kthvalue(values, index + 1).values


def clip_ranks(d: int) -> tuple[int, int]:
    """0-based ascending indices of the low and high clip values in a vector of ``d`` (the official ``clamp``)."""
    return int(d * CLIP), int(d * (1 - CLIP) - 1)


def drop_index(d: int, ratio: float) -> int:
    return int(d * (1 - ratio))


def pcb_scores(task_vectors: torch.Tensor, clips: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(β_i, τ̂_i), stacked (N, ...), element by element, given each model's clip values (low, high)."""
    n = task_vectors.shape[0]
    low = torch.tensor([c[0] for c in clips], dtype=task_vectors.dtype, device=task_vectors.device)
    high = torch.tensor([c[1] for c in clips], dtype=task_vectors.dtype, device=task_vectors.device)
    shape = (n, *([1] * (task_vectors.dim() - 1)))
    low, high = low.view(shape), high.view(shape)
    magnitude = torch.minimum(torch.maximum(task_vectors.abs(), low), high)
    clipped = task_vectors.sign() * magnitude
    spread = high - low
    intra = torch.exp(n * ((magnitude - low) / torch.where(spread > 0, spread, 1)).square())
    inter = torch.tanh(task_vectors * task_vectors.sum(dim=0, keepdim=True))
    return intra * inter, clipped


def pcb_combine(scores: torch.Tensor, clipped: torch.Tensor, drops: list[tuple[float, float]]) -> torch.Tensor:
    """Σ_i β̂_i τ̂_i / max(Σ_i β̂_i, 1e-12), β̂_i = norm(max(β_i, q_i)) with each model's (q_i, max β_i)."""
    shape = (scores.shape[0], *([1] * (scores.dim() - 1)))
    q = torch.tensor([d[0] for d in drops], dtype=scores.dtype, device=scores.device).view(shape)
    top = torch.tensor([d[1] for d in drops], dtype=scores.dtype, device=scores.device).view(shape)
    spread = top - q
    weights = (torch.maximum(scores, q) - q) / torch.where(spread > 0, spread, 1)
    return (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)


def _tensor_orders(task_vectors: torch.Tensor, ratio: float):
    """The order statistics of one tensor (``pcb_scope: tensor``): clips, then the drop threshold and maximum."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    d = flat.shape[1]
    lo, hi = clip_ranks(d)
    clips = [(float(_ascending(a, lo)), float(_ascending(a, hi))) for a in flat.abs()]
    scores, clipped = pcb_scores(task_vectors, clips)
    flat_scores = scores.reshape(len(clips), -1)
    drops = [(float(_ascending(s, drop_index(d, ratio))), float(s.max())) for s in flat_scores]
    return scores, clipped, drops


def pcb(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """PCB-Merging: see the module docstring."""
    task_vectors = torch.stack([theta - base for theta in models])
    if params["pcb_scope"] == "model":
        found = ctx.model_stats
        n = len(models)
        clips = [(found["pcb_clip"][2 * i], found["pcb_clip"][2 * i + 1]) for i in range(n)]
        scores, clipped = pcb_scores(task_vectors, clips)
        drops = [(found["pcb_drop"][2 * i], found["pcb_drop"][2 * i + 1]) for i in range(n)]
    else:
        scores, clipped, drops = _tensor_orders(task_vectors, params["ratio"])
    merged = pcb_combine(scores, clipped, drops)
    return base + params["lambda"] * lines_scale(params, ctx, len(models)) * merged


def _model_scope(params: dict) -> bool:
    return params.get("pcb_scope") == "model"


def _abs_entries(base, models, params, ctx):  # two entries per model: its low and its high clip
    return [a for m in models for a in ((m - base).abs(),) * 2]


def _clip_rank(params: dict, j: int, d: int) -> int:  # the j-th entry's rank from the top
    lo, hi = clip_ranks(d)
    return d - (lo if j % 2 == 0 else hi)


def _score_entries(base, models, params, ctx):  # two per model: β_i for the drop threshold and for its maximum
    clips = ctx.model_stats["pcb_clip"]
    task_vectors = torch.stack([m - base for m in models])
    scores, _ = pcb_scores(task_vectors, [(clips[2 * i], clips[2 * i + 1]) for i in range(len(models))])
    return [s for s in scores for _ in range(2)]


def _drop_rank(params: dict, j: int, d: int) -> int:
    return d - drop_index(d, params["ratio"]) if j % 2 == 0 else 1


PCB_MODEL_PASSES = (global_topk_passes(_clip_rank, key="pcb_clip", needed=_model_scope, score=_abs_entries)
                    + global_topk_passes(_drop_rank, key="pcb_drop", needed=_model_scope, score=_score_entries))


def _pcb_plan(plan) -> bool:
    """``model_stats_needed`` and ``elementwise`` of PCB: whole-model scope everywhere, or per tensor everywhere."""
    scopes = {t.params["pcb_scope"] for t in plan.tasks if not t.copy}
    if len(scopes) > 1:
        raise ConfigError("pcb: `pcb_scope` must be the same for every tensor")
    ratios = {t.params["ratio"] for t in plan.tasks if not t.copy}
    if scopes == {"model"} and len(ratios) > 1:
        raise ConfigError("pcb: with `pcb_scope: model` the `ratio` must be the same for every tensor")
    return scopes == {"model"}


def consensus(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Consensus merging with TALL masks: see the module docstring."""
    task_vectors = torch.stack([theta - base for theta in models])
    total = task_vectors.sum(dim=0)
    lam = torch.tensor(params["tall_lambda"], dtype=total.dtype, device=total.device)
    lam = lam.view(-1, *([1] * base.dim()))
    masks = task_vectors.abs() > lam * (total - task_vectors).abs()
    keep = masks.sum(dim=0) >= params["k"]
    return base + params["lambda"] * lines_scale(params, ctx, len(models)) * total * keep


register(MergeMethod(
    name="pcb", fn=pcb,
    summary="weigh each task's entries by their own magnitude and their agreement with the others, keep the top, "
            "average",
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging (PCB-Merging, NeurIPS, "
          "arXiv:2410.02396)",
    params=(Param("ratio", float, 0.1, "fraction r of each task vector's entries kept, by balanced score β",
                  min=0.0, max=1.0, min_exclusive=True),
            Param("lambda", float, 1.0, "scales the merged task vector"),
            Param("pcb_scope", str, "model", "the order statistics over the whole `model` (the paper; two more "
                  "whole-model passes) or each `tensor`", choices=("model", "tensor")), *LINES_PARAMS),
    presets=(Preset("paper", "keep 10 %, λ = 1, whole model (Du et al.; λ searched there)",
                    {"ratio": 0.1, "lambda": 1.0, "pcb_scope": "model"}),),
    base="required", min_models=1, elementwise=_pcb_plan, model_stats=PCB_MODEL_PASSES,
    model_stats_needed=_pcb_plan, reduce=make_reduce(pcb), reduce_needed=needs_reduction, reduce_stats=reduce_stats,
))

register(MergeMethod(
    name="consensus", fn=consensus,
    summary="task arithmetic without the entries fewer than k tasks need (TALL masks: selfish and catastrophic "
            "weights)",
    paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (Consensus "
          "merging, TALL masks; ICML, arXiv:2405.07813)",
    params=(Param("tall_lambda", float, 0.4, "λ_t of task t's TALL mask |τ_t| > λ_t |τ_MTL − τ_t|", per_model=True,
                  min=0.0),
            Param("k", int, 2, "keep entries at least k tasks' masks mark (2 removes selfish and catastrophic ones)",
                  min=0),
            Param("lambda", float, 1.0, "α: scales the masked task-arithmetic sum"), *LINES_PARAMS),
    presets=(Preset("paper", "k = 2, λ_t = 0.4, α = 1 (Wang et al.; λ_t and α picked on validation there)",
                    {"k": 2, "tall_lambda": 0.4, "lambda": 1.0}),),
    base="required", min_models=1, elementwise=True, reduce=make_reduce(consensus), reduce_needed=needs_reduction,
    reduce_stats=reduce_stats,
))

