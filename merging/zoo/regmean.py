"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", arXiv:2212.09849).

For a linear layer y = x Wᵀ, the weights that best reproduce every model's outputs on its own inputs,
min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², have a closed form in the inputs' Gram matrices G_i = X_iᵀ X_i:

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,      G̃_i = α G_i + (1 − α) diag(G_i)

The shrink α < 1 of the off-diagonal entries (the paper uses about 0.9) regularizes: it equals adding a ridge that
pulls W toward each W_i, and at α = 0 the formula becomes a per-input-feature weighted average. Every other
parameter (biases, norms, embeddings) is averaged. Data-aware: it needs each task's inputs, so it runs on the zoo.
"""

from __future__ import annotations

import torch
from torch import nn

from .eval import Zoo
from .model import HEAD_PREFIX, build_model

DEFAULT_ALPHA = 0.9


def gram_matrices(model: nn.Module, x: torch.Tensor, skip_prefix: str = HEAD_PREFIX) -> dict[str, torch.Tensor]:
    """G = Xᵀ X (float64) of the input of every nn.Linear, keyed by its weight's name (``blocks.0.mlp.fc1.weight``).

    X stacks the layer's input rows over the examples (and tokens): G is a sum, so a task with more examples
    counts more, as in the paper.
    """
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not (name + ".").startswith(skip_prefix):
            def hook(mod, inputs, output, key=f"{name}.weight"):
                rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                grams[key] = grams.get(key, 0) + rows.T @ rows
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return grams


def regmean_weight(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = DEFAULT_ALPHA
                   ) -> torch.Tensor:
    """Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ with G̃_i = α G_i + (1 − α) diag(G_i); W_i is (out, in) as torch stores it."""
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    lhs = sum(shrunk)
    rhs = sum(g @ w.to(torch.float64).T for g, w in zip(shrunk, weights))
    return torch.linalg.solve(lhs, rhs).T.to(weights[0].dtype).contiguous()


def regmean_states(states: list[dict[str, torch.Tensor]], grams: list[dict[str, torch.Tensor]],
                   alpha: float = DEFAULT_ALPHA) -> dict[str, torch.Tensor]:
    """RegMean for every tensor with a Gram matrix, the plain average for the rest (names of the first state)."""
    merged = {}
    for name in states[0]:
        if name in grams[0]:
            merged[name] = regmean_weight([s[name] for s in states], [g[name] for g in grams], alpha)
        else:
            merged[name] = sum(s[name] for s in states) / len(states)
    return merged


def regmean_merge(zoo: Zoo, tasks: list[str] | None = None, examples: int = 256, alpha: float = DEFAULT_ALPHA,
                  split: str = "train") -> dict[str, torch.Tensor]:
    """RegMean over the zoo's task fine-tunes, each Gram from ``examples`` of its own task's inputs.

    The heads are per task and not merged: the output keeps the base's head.
    """
    tasks = tasks or zoo.tasks
    states, grams = [], []
    for task in tasks:
        state = zoo.state(task)
        x, _ = zoo.data(task, split)
        grams.append(gram_matrices(build_model(zoo.config, state), x[:examples]))
        states.append({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)})
    merged = regmean_states(states, grams, alpha)
    merged.update({k: v.clone() for k, v in zoo.state("base").items() if k.startswith(HEAD_PREFIX)})
    return merged
