"""Git Re-Basin weight matching (Ainsworth et al. 2023, arXiv:2209.04836) and REPAIR (Jordan et al. 2023,
arXiv:2211.08403) on two MLPs trained from different random initializations.

Hidden units can be permuted without changing the function, so two independently trained networks are rarely
aligned and their average is poor (the *barrier* on the interpolation path). Weight matching finds, for each hidden
layer ℓ, a permutation P_ℓ of B's units maximizing

    Σ_ℓ ⟨W_A^ℓ, P_ℓ W_B^ℓ P_{ℓ−1}ᵀ⟩ + ⟨b_A^ℓ, P_ℓ b_B^ℓ⟩

one layer at a time with the others fixed (a linear assignment, ``scipy.optimize.linear_sum_assignment``), in a
seeded random order, until a sweep changes nothing. REPAIR then fixes the variance collapse of the interpolated
network: each hidden unit's pre-activation is renormalized to the interpolation of the endpoints' statistics,
μ_t = (1−α)μ_A + αμ_B, σ_t = (1−α)σ_A + ασ_B (the paper inserts BatchNorm and recomputes it; with a plain affine
layer the same reset folds into W and b directly).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .data import task_data
from .eval import Zoo, accuracy
from .model import DigitMLP, build_model
from .train import MLP_TASK

State = dict[str, torch.Tensor]


def _num_hidden(state: State) -> int:
    return sum(1 for k in state if k.startswith("layers.") and k.endswith(".weight")) - 1


def permute_state(state: State, perms: list[np.ndarray]) -> State:
    """Reorder the hidden units: unit k of layer ℓ becomes unit perms[ℓ][k] of the input (same function)."""
    out = {k: v.clone() for k, v in state.items()}
    for layer, perm in enumerate(perms):
        p = torch.as_tensor(perm, dtype=torch.long)
        out[f"layers.{layer}.weight"] = out[f"layers.{layer}.weight"][p]
        out[f"layers.{layer}.bias"] = out[f"layers.{layer}.bias"][p]
        out[f"layers.{layer + 1}.weight"] = out[f"layers.{layer + 1}.weight"][:, p]
    return out


def weight_matching(a: State, b: State, seed: int = 0, max_sweeps: int = 100) -> list[np.ndarray]:
    """Permutations of B's hidden units that align it with A (coordinate descent over layers; see module doc)."""
    hidden = _num_hidden(a)
    wa = [a[f"layers.{i}.weight"].double() for i in range(hidden + 1)]
    wb = [b[f"layers.{i}.weight"].double() for i in range(hidden + 1)]
    ba = [a[f"layers.{i}.bias"].double() for i in range(hidden)]
    bb = [b[f"layers.{i}.bias"].double() for i in range(hidden)]
    perms = [np.arange(w.shape[0]) for w in wa[:hidden]]
    rng = np.random.default_rng(seed)
    for _ in range(max_sweeps):
        changed = False
        for layer in rng.permutation(hidden):
            incoming = wb[layer] if layer == 0 else wb[layer][:, perms[layer - 1]]
            outgoing = wb[layer + 1] if layer + 1 == hidden else wb[layer + 1][perms[layer + 1]]
            # similarity[k, m]: how well B's unit m stands in for A's unit k, through its in- and outgoing weights.
            similarity = wa[layer] @ incoming.T + torch.outer(ba[layer], bb[layer]) + wa[layer + 1].T @ outgoing
            sim = similarity.numpy()
            _, cols = linear_sum_assignment(sim, maximize=True)
            old_score = sim[np.arange(len(cols)), perms[layer]].sum()
            new_score = sim[np.arange(len(cols)), cols].sum()
            if new_score > old_score + 1e-12:
                perms[layer] = cols
                changed = True
        if not changed:
            break
    return perms


def interpolate(a: State, b: State, alpha: float) -> State:
    """θ(α) = (1 − α) θ_A + α θ_B."""
    return {k: (1 - alpha) * a[k] + alpha * b[k] for k in a}


def _preactivation_stats(state: State, config: dict, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = build_model(config, state)
    with torch.no_grad():
        _, pre = model(x, return_preactivations=True)
    return [(h.mean(0), h.std(0, unbiased=False)) for h in pre]


def repair(merged: State, a: State, b: State, alpha: float, config: dict, x: torch.Tensor, eps: float = 1e-5) -> State:
    """REPAIR: renormalize each hidden unit of ``merged`` to μ_t = (1−α)μ_A + αμ_B, σ_t = (1−α)σ_A + ασ_B
    (statistics over ``x``), layer by layer so that each correction sees the previous ones."""
    stats_a = _preactivation_stats(a, config, x)
    stats_b = _preactivation_stats(b, config, x)
    out = {k: v.clone() for k, v in merged.items()}
    for layer, ((mu_a, sd_a), (mu_b, sd_b)) in enumerate(zip(stats_a, stats_b)):
        mu_t, sd_t = (1 - alpha) * mu_a + alpha * mu_b, (1 - alpha) * sd_a + alpha * sd_b
        mu_m, sd_m = _preactivation_stats(out, config, x)[layer]
        scale = sd_t / (sd_m + eps)
        out[f"layers.{layer}.weight"] = out[f"layers.{layer}.weight"] * scale[:, None]
        out[f"layers.{layer}.bias"] = (out[f"layers.{layer}.bias"] - mu_m) * scale + mu_t
    return out


def barrier_curve(zoo: Zoo, a: str = "mlp_a", b: str = "mlp_b", points: int = 11, split: str = "test",
                  stats_split: str = "train", seed: int = 0) -> dict:
    """Accuracy along θ(α) for naive interpolation, after weight matching, and after weight matching + REPAIR.

    Returns {"alpha": [...], "naive": [...], "rebasin": [...], "rebasin_repair": [...], "barrier": {...},
    "matched_units": fraction of B's units that weight matching moved}.
    """
    state_a, state_b = zoo.state(a), zoo.state(b)
    config = _mlp_config(zoo, a)
    perms = weight_matching(state_a, state_b, seed)
    aligned = permute_state(state_b, perms)
    x, y = task_data(MLP_TASK, split, zoo.seed)
    x_stats, _ = task_data(MLP_TASK, stats_split, zoo.seed)
    alphas = [i / (points - 1) for i in range(points)]
    curves: dict[str, list[float]] = {"naive": [], "rebasin": [], "rebasin_repair": []}
    for alpha in alphas:
        naive = interpolate(state_a, state_b, alpha)
        matched = interpolate(state_a, aligned, alpha)
        repaired = repair(matched, state_a, aligned, alpha, config, x_stats) if 0 < alpha < 1 else matched
        for key, state in (("naive", naive), ("rebasin", matched), ("rebasin_repair", repaired)):
            curves[key].append(accuracy(build_model(config, state), x, y, 10))
    moved = float(np.mean([np.mean(p != np.arange(len(p))) for p in perms]))
    return {"alpha": alphas, **curves, "barrier": {k: barrier(alphas, v) for k, v in curves.items()},
            "matched_units": moved, "models": [a, b], "split": split}


def barrier(alphas: list[float], accuracies: list[float]) -> float:
    """The largest drop below the straight line between the endpoints' accuracies (0 = no barrier)."""
    start, end = accuracies[0], accuracies[-1]
    return max((1 - t) * start + t * end - acc for t, acc in zip(alphas, accuracies))


def _mlp_config(zoo: Zoo, name: str) -> dict:
    from .model import read_config

    config = read_config(zoo.root / name)
    if (config.get("architectures") or [""])[0] != DigitMLP.__name__:
        raise ValueError(f"{zoo.root / name}: not a DigitMLP checkpoint")
    return config
