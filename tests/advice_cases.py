"""Synthetic merge problems with a known best method, for testing and calibrating ``merging.advice``.

Each case writes a llama-shaped base and N fine-tunes whose task vectors τ_i have a chosen structure, and gives each
task a loss that says what it cares about: a diagonal curvature h_i (the diagonal-Fisher picture of Matena & Raffel
2022, under which Fisher merging is the optimum), so that

    loss_i(θ) = Σ h_i (θ − θ_i)² / Σ h_i τ_i²        (0: the fine-tune itself; 1: the base)
    score(θ) = mean_i (1 − loss_i(θ))                 (1: every task kept; 0: no better than the base)

Two families, each built from the assumption under which one method is the right one:

- ``disjoint``: task i changed, and cares about (h_i = 1), its own 10 % of the coordinates; elsewhere it carries
  dense noise of ``noise`` × the signal's scale and cares little (h_i = 0.05). Little noise: adding the task vectors
  (task arithmetic) keeps every task. Much noise: summing it hurts, and TIES' trim drops it.
- ``dense``: Gaussian task vectors and every task caring about every weight (h_i = 1): the best merge is the average
  weighted by 1/‖τ_i‖², so with one task vector far larger than the others NAN's 1/‖τ_i‖ beats a plain average.

The four named cases of ``CASES`` (and what wins there): ``orthogonal`` (4 small disjoint task vectors, noise 0.05:
task arithmetic), ``conflicting`` (8 task vectors in dense noise half their size: TIES), ``dominant`` (4 dense ones,
one 5× the others: NAN), ``two`` (2 task vectors whose important coordinates overlap by 40 %: NuSLERP, whose
1/√2 scale of τ_1 + τ_2 is near the best 1/(1 + 0.4); an average gives 1/2, the sum 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoints import llama_config, llama_tensors, save_checkpoint

CASES = {
    "orthogonal": {"family": "disjoint", "n": 4, "noise": 0.05},
    "conflicting": {"family": "disjoint", "n": 8, "noise": 0.5, "shift": 2.0},
    "dominant": {"family": "dense", "n": 4, "scale0": 5.0},
    "two": {"family": "two", "n": 2, "noise": 0.05},
}
# What the advice should recommend on each case: the method, and the NAN switch where it matters.
EXPECTED = {"orthogonal": "task_arithmetic", "conflicting": "ties", "dominant": "task_arithmetic+nan", "two": "nuslerp"}


@dataclass
class Case:
    name: str
    base: Path
    models: list[Path]
    score: Callable[[dict[str, torch.Tensor]], float]  # merged tensors -> the case's score (see above)

    def config(self, method: str, parameters: dict | None = None, model_parameters: dict | None = None) -> dict:
        return {"merge_method": method, "base_model": str(self.base),
                "models": [{"model": str(m), "parameters": dict(model_parameters or {})} for m in self.models],
                "parameters": dict(parameters or {})}


def write_case(root: Path, name: str = "", *, family: str = "disjoint", n: int = 4, noise: float = 0.05,
               shift: float = 1.0, scale0: float = 1.0, gamma: float = 0.05, seed: int = 0) -> Case:
    """A base and ``n`` fine-tunes under ``root`` (see the module docstring); ``scale0`` scales the first task
    vector (and its target), ``shift`` the signal's magnitudes (|N(0, 1)| + shift)."""
    cfg = llama_config(hidden=32, intermediate=64, layers=4, vocab=64, heads=2)
    base = llama_tensors(cfg, seed)
    gen = torch.Generator().manual_seed(1 + seed)
    taus: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    hess: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, theta in base.items():
        shape = theta.shape
        sigma = 0.01 * (theta.float().std().item() if theta.dim() > 1 else theta.float().abs().mean().item())
        if family == "two":
            u = torch.rand(shape, generator=gen)
            owns = [(u < 0.5).float(), ((u >= 0.3) & (u < 0.8)).float()]  # [0, .5) and [.3, .8): 40 % shared
        elif family == "disjoint":
            part = torch.randint(0, 10, shape, generator=gen)  # ten buckets, task i owns bucket i
            owns = [(part == i).float() for i in range(n)]
        for i in range(n):
            scale = sigma * (scale0 if i == 0 else 1.0)
            if family == "dense":
                taus[i][key] = scale * torch.randn(shape, generator=gen)
                hess[i][key] = torch.ones(shape)
                continue
            signal = (torch.randn(shape, generator=gen).abs() + shift) * torch.sign(torch.randn(shape, generator=gen))
            taus[i][key] = scale * (owns[i] * signal + noise * torch.randn(shape, generator=gen))
            hess[i][key] = owns[i] + gamma * (1 - owns[i])
    root = Path(root)
    base_dir = save_checkpoint(root / "base", base, cfg)
    models = [save_checkpoint(root / f"task{i}", {k: base[k] + taus[i][k] for k in base}, cfg) for i in range(n)]

    def score(merged: dict[str, torch.Tensor]) -> float:
        total = 0.0
        for i in range(n):
            num = sum(float((hess[i][k] * (merged[k].float() - base[k] - taus[i][k]) ** 2).sum()) for k in base)
            den = sum(float((hess[i][k] * taus[i][k] ** 2).sum()) for k in base)
            total += 1 - num / den
        return total / n

    return Case(name or family, base_dir, models, score)


def named_case(name: str, root: Path) -> Case:
    return write_case(root, name, **CASES[name])


def merged_state(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """Run ``config`` through the library (``run_merge``, as the CLI does) and read the merged tensors back."""
    from safetensors.torch import load_file

    from merging.config import config_from_dict
    from merging.engine import run_merge

    run_merge(config_from_dict(config, source="case"), out, device="cpu")
    return load_file(str(out / "model.safetensors"))


def candidates(n_models: int) -> dict[str, tuple[str, dict, dict]]:
    """Every config the advice can recommend for base + ``n_models``, with the parameters it gives them:
    label -> (method, parameters, per-model parameters)."""
    out = {
        "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}, {}),
        "ties": ("ties", {"lambda": 1.0}, {"density": 0.2}),
        "linear": ("linear", {}, {}),
        "task_arithmetic+nan": ("task_arithmetic", {"lambda": 1.0, "coefficients": "nan", "nan_on": "task_vector"},
                                {}),
    }
    if n_models == 2:
        out["nuslerp"] = ("nuslerp", {}, {})
    return out


def recommendation_label(rec: dict) -> str:
    """The ``candidates`` label of an advice's recommendation."""
    nan = rec["parameters"].get("coefficients") == "nan"
    return rec["method"] + ("+nan" if nan else "")
