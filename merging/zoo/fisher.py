"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832).

Each parameter is averaged with weights given by how much each model's predictions depend on it, the diagonal of
the model's Fisher information on its own task's inputs:

    F_i[j] = (1/N) Σ_n Σ_c p_i(c | x_n) · (∂ log p_i(c | x_n) / ∂θ_i[j])²        (the exact expectation over c)
    θ*[j]  = Σ_i (F_i[j] + ε) θ_i[j] / Σ_i (F_i[j] + ε)

ε keeps parameters that no model's output depends on (unused head rows) at the plain average.
Data-aware: it needs each task's inputs, so it runs on the zoo (``python -m merging zoo table``), not in the
streaming engine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .data import TASKS
from .eval import Zoo
from .model import HEAD_PREFIX, build_model

EPSILON = 1e-8


def diagonal_fisher(model: nn.Module, x: torch.Tensor, num_classes: int, batch: int = 32) -> dict[str, torch.Tensor]:
    """F[j] = mean over x of Σ_c p(c|x) (∂ log p(c|x)/∂θ[j])², the logits being the first ``num_classes`` outputs."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_probs(p: dict[str, torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x1.unsqueeze(0),))[0, :num_classes].log_softmax(-1)

    per_example = vmap(jacrev(log_probs), in_dims=(None, 0))  # name → (B, C, *shape)
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        with torch.no_grad():
            probs = log_probs_batch(model, xb, num_classes).exp()  # (B, C)
        jac = per_example(params, xb)
        for name, g in jac.items():
            weights = probs.view(*probs.shape, *([1] * (g.dim() - 2)))
            fisher[name] += (weights * g.square()).sum(dim=(0, 1))
    return {k: v / len(x) for k, v in fisher.items()}


def log_probs_batch(model: nn.Module, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    return model(x)[:, :num_classes].log_softmax(-1)


def fisher_average(states: list[dict[str, torch.Tensor]], fishers: list[dict[str, torch.Tensor]],
                   epsilon: float = EPSILON) -> dict[str, torch.Tensor]:
    """θ*[j] = Σ_i (F_i[j] + ε) θ_i[j] / Σ_i (F_i[j] + ε), tensor by tensor (names of the first state)."""
    merged = {}
    for name in states[0]:
        weights = [f[name] + epsilon for f in fishers]
        merged[name] = sum(w * s[name] for w, s in zip(weights, states)) / sum(weights)
    return merged


def fisher_merge(zoo: Zoo, tasks: list[str] | None = None, examples: int = 256, split: str = "train"
                 ) -> dict[str, torch.Tensor]:
    """Fisher-merge the zoo's task fine-tunes, each Fisher from ``examples`` of its own task's inputs.

    The heads are per task and not merged: the output keeps the base's head (evaluation uses each task's own).
    """
    tasks = tasks or zoo.tasks
    states, fishers = [], []
    for task in tasks:
        state = zoo.state(task)
        model = build_model(zoo.config, state)
        x, _ = zoo.data(task, split)
        fisher = diagonal_fisher(model, x[:examples], TASKS[task].num_classes)
        states.append({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)})
        fishers.append({k: fisher[k] for k in states[-1]})
    merged = fisher_average(states, fishers)
    merged.update({k: v.clone() for k, v in zoo.state("base").items() if k.startswith(HEAD_PREFIX)})
    return merged
