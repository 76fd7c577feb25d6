"""Library functions behind the app's "Learn" view: pure functions from the zoo to plain dicts (no UI here).

- ``table_data``: the EMR paper's table on the zoo (the committed ``table.json``, or computed).
- ``lambda_sweep``: per-task accuracy of task arithmetic at one λ (for a live slider).
- ``barrier_curve``: Git Re-Basin and REPAIR's interpolation curves.
- ``emr_steps``: EMR-Merging step by step, the paper's ablation (Huang et al. 2024, Table 7): elect only, elect +
  mask, elect + rescale, elect + mask + rescale, with the accuracy after each.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .eval import Zoo, average, evaluate_state
from .merges import merged_tensors, zoo_config
from .model import HEAD_PREFIX
from .train import single_thread


@lru_cache(maxsize=2)
def _zoo(root: str | None) -> Zoo:
    return Zoo(root) if root else Zoo()


def _get(zoo: Zoo | str | Path | None) -> Zoo:
    return zoo if isinstance(zoo, Zoo) else _zoo(str(zoo) if zoo else None)


def table_data(zoo: Zoo | str | None = None, recompute: bool = False) -> dict:
    """The table as data (see table.build_table): read from ``<zoo>/table.json`` unless ``recompute``."""
    z = _get(zoo)
    cached = z.root / "table.json"
    if cached.is_file() and not recompute:
        return json.loads(cached.read_text())
    from .table import build_table

    return build_table(z)


def lambda_sweep(lam: float, zoo: Zoo | str | None = None, split: str = "test") -> dict:
    """Task arithmetic θ = θ_base + λ Σ_i τ_i at one λ, scored per task with each task's head.

    Returns {"lambda", "accuracy": {task: acc}, "average", "individual": {task: acc}, "normalized"}.
    """
    z = _get(zoo)
    config = zoo_config(z, "task_arithmetic", {"lambda": float(lam)})
    with single_thread():
        scores = evaluate_state(z, merged_tensors(config, z), z.tasks, split)
        individual = _individual(z, split)
    return {"lambda": float(lam), "accuracy": scores, "average": average(scores), "individual": individual,
            "normalized": sum(scores[t] / individual[t] for t in scores) / len(scores), "split": split}


def barrier_curve(zoo: Zoo | str | None = None, points: int = 11) -> dict:
    """Accuracy along the interpolation path of mlp_a and mlp_b: naive, re-basin, re-basin + REPAIR."""
    from .rebasin import barrier_curve as curve

    with single_thread():
        return curve(_get(zoo), points=points)


def emr_steps(zoo: Zoo | str | None = None, split: str = "test") -> dict:
    """EMR-Merging built up one step at a time, scored per task after each step.

    Per body tensor (the heads are per task): τ_i = θ_i − θ_base; elect: ε = sign(Σ_i τ_i) (0 → −1, as the official
    code), τ_uni = ε ⊙ max_i |τ_i ⊙ [τ_i ε > 0]|; mask: M_i = [τ_i ε > 0]; rescale: λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| over
    the whole body. Task i then runs θ_base + λ_i (M_i ⊙ τ_uni). The four rows are the paper's ablation.
    """
    with single_thread():
        return _emr_steps(_get(zoo), split)


def _emr_steps(z: Zoo, split: str) -> dict:
    tasks = z.tasks
    base = z.state("base")
    body = [k for k in base if not k.startswith(HEAD_PREFIX)]
    vectors = {t: {k: z.state(t)[k] - base[k] for k in body} for t in tasks}
    unified, masks = {}, {t: {} for t in tasks}
    for k in body:
        stacked = torch.stack([vectors[t][k] for t in tasks])
        flag = torch.where(stacked.sum(0) > 0, 1.0, -1.0)
        agree = stacked * flag > 0
        unified[k] = flag * (stacked.abs() * agree).amax(0)
        for i, t in enumerate(tasks):
            masks[t][k] = agree[i]

    def l1(tensors) -> float:
        return float(sum(v.abs().sum() for v in tensors))

    rescale_masked = {t: l1(vectors[t].values()) / l1(unified[k] * masks[t][k] for k in body) for t in tasks}
    rescale_plain = {t: l1(vectors[t].values()) / l1(unified.values()) for t in tasks}

    def score(step: str) -> dict[str, float]:
        out = {}
        for t in tasks:
            scale = {"elect": 1.0, "elect+mask": 1.0, "elect+rescale": rescale_plain[t],
                     "elect+mask+rescale": rescale_masked[t]}[step]
            use_mask = "mask" in step
            state = dict(base)
            for k in body:
                delta = unified[k] * masks[t][k] if use_mask else unified[k]
                state[k] = base[k] + scale * delta
            out[t] = evaluate_state(z, state, [t], split)[t]
        return out

    individual = _individual(z, split)
    steps = []
    for step in ("elect", "elect+mask", "elect+rescale", "elect+mask+rescale"):
        scores = score(step)
        steps.append({"step": step, "accuracy": scores, "average": average(scores),
                      "normalized": sum(scores[t] / individual[t] for t in tasks) / len(tasks)})
    numel = sum(base[k].numel() for k in body)
    density = {t: float(sum(masks[t][k].sum() for k in body)) / numel for t in tasks}
    return {"steps": steps, "individual": individual, "mask_density": density, "rescalers": rescale_masked,
            "split": split, "paper_vit_b32": {"elect": 59.3, "elect+mask": 86.8, "elect+rescale": 71.9,
                                              "elect+mask+rescale": 88.7}}


def _individual(zoo: Zoo, split: str) -> dict[str, float]:
    """Each fine-tune's accuracy on its own task (kept: the zoo does not change under a running app)."""
    key = (str(zoo.root.resolve()), split)
    if key not in _INDIVIDUAL:
        _INDIVIDUAL[key] = {t: evaluate_state(zoo, zoo.state(t), [t], split)[t] for t in zoo.tasks}
    return dict(_INDIVIDUAL[key])


_INDIVIDUAL: dict[tuple[str, str], dict[str, float]] = {}  # a handful of entries: one per zoo folder and split
