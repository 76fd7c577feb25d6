"""Evolutionary search of merge coefficients (Akiba et al. 2024, "Evolutionary Optimization of Model Merging
Recipes", arXiv:2403.13187) with CMA-ES (Hansen's ``cma`` package).

The search variables are the per-model weights of a task-vector merge, one per model (``granularity="model"``) or
one per model and layer (``"layer"``: a list of anchors over depth, interpolated by the library as for any config);
for TIES, whose weights are normalized, the global λ is searched too. The objective is the average accuracy on the
*validation* split over all tasks, each merged body scored with the task's own head; the test split is never read
here. Every candidate is a real merge config run through the library (``merges.merged_tensors``), so the best one
is saved as an ordinary YAML that ``python -m merging merge`` reruns.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import MergeConfig
from ..errors import ConfigError
from .eval import Zoo, average, evaluate_state
from .merges import merged_tensors, zoo_config
from .train import single_thread

SEARCH_SPLIT = "val"
BOUNDS = (0.0, 1.5)
METHODS = {
    # method: (fixed global parameters, starting per-model weight, whether λ is searched too)
    "task_arithmetic": ({"lambda": 1.0}, 0.3, False),
    "ties": ({"density": 0.2}, 1.0, True),
}


@dataclass
class SearchResult:
    config: MergeConfig
    start_score: float
    best_score: float
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)  # the best validation score after each generation

    def to_dict(self) -> dict:
        return {"start_val_accuracy": self.start_score, "best_val_accuracy": self.best_score,
                "evaluations": self.evaluations, "seconds": self.seconds, "history": self.history,
                "method": self.config.merge_method}


def candidate_config(zoo: Zoo, method: str, x: np.ndarray, granularity: str, tasks: list[str], seed: int = 0
                     ) -> MergeConfig:
    """The merge config a search vector stands for."""
    fixed, _, with_lambda = METHODS[method]
    params = dict(fixed)
    values = [float(round(v, 6)) for v in np.clip(x, *BOUNDS)]
    if with_lambda:
        params["lambda"] = values.pop()
    per_model = []
    if granularity == "layer":
        layers = len(values) // len(tasks)
        for i in range(len(tasks)):
            per_model.append({"weight": values[i * layers:(i + 1) * layers]})
    else:
        per_model = [{"weight": v} for v in values]
    return zoo_config(zoo, method, params, per_model, tasks, seed)


def validation_score(zoo: Zoo, config: MergeConfig, tasks: list[str]) -> float:
    """Average validation accuracy of a merge over ``tasks`` (the search objective)."""
    return average(evaluate_state(zoo, merged_tensors(config, zoo), tasks, SEARCH_SPLIT))


def evolve(zoo: Zoo, method: str = "task_arithmetic", granularity: str = "model", budget: int = 120,
           popsize: int = 8, sigma0: float = 0.15, seed: int = 0, tasks: list[str] | None = None, log=None
           ) -> SearchResult:
    """CMA-ES over merge coefficients, starting from the usual setting (task arithmetic with λ = 0.3 per model;
    TIES with weight 1, λ = 1); ``budget`` counts merges evaluated, the start included."""
    with warnings.catch_warnings():  # cma warns at import that matplotlib (its plotting) is missing
        warnings.simplefilter("ignore")
        import cma

    if method not in METHODS:
        raise ConfigError(f"zoo evolve: method {method!r} is not searchable (use {', '.join(METHODS)})")
    if granularity not in ("model", "layer"):
        raise ConfigError(f"zoo evolve: granularity {granularity!r}: use model or layer")
    tasks = tasks or zoo.tasks
    started = time.monotonic()
    _, start_weight, with_lambda = METHODS[method]
    per_model = zoo.config.get("num_layers", 1) if granularity == "layer" else 1
    x0 = np.full(len(tasks) * per_model + (1 if with_lambda else 0), start_weight)
    if with_lambda:
        x0[-1] = 1.0

    def score(x: np.ndarray) -> tuple[float, MergeConfig]:
        config = candidate_config(zoo, method, x, granularity, tasks, seed)
        return validation_score(zoo, config, tasks), config

    with single_thread():  # the tensors are tiny: one thread is fastest, more only contend
        start_score, best_config = score(x0)
        best_score, evaluations, history = start_score, 1, []
        options = {"seed": 1 + seed, "popsize": popsize, "bounds": list(BOUNDS), "verbose": -9,
                   "maxfevals": max(budget - 1, popsize)}
        es = cma.CMAEvolutionStrategy(x0.tolist(), sigma0, options)
        while not es.stop() and evaluations + popsize <= budget:
            candidates = es.ask()
            losses = []
            for x in candidates:
                value, config = score(np.asarray(x))
                evaluations += 1
                losses.append(-value)  # cma minimizes
                if value > best_score:
                    best_score, best_config = value, config
            es.tell(candidates, losses)
            history.append(best_score)
            if log:
                log(f"generation {len(history)}: best validation accuracy {best_score:.4f} ({evaluations} merges)")
    return SearchResult(best_config, start_score, best_score, evaluations, time.monotonic() - started, history)


def save_config(config: MergeConfig, path: str | Path, zoo: Zoo, note: str = "") -> Path:
    """Write the config as YAML, with the zoo's paths relative to the current folder when they lie inside it."""
    def rel(ref: str) -> str:
        try:
            return os.path.relpath(ref) if Path(ref).resolve().is_relative_to(Path.cwd().resolve()) else ref
        except ValueError:
            return ref

    data = config.model_dump(exclude_defaults=True, mode="json")
    data["base_model"] = rel(data["base_model"])
    for entry in data["models"]:
        entry["model"] = rel(entry["model"])
    import yaml

    header = "# Found by `python -m merging zoo evolve` (CMA-ES on validation accuracy; the test split unseen).\n"
    header += "# Rerun from the repository root: python -m merging merge assets/zoo/evolved.yml OUT_DIR\n"
    if note:
        header += "".join(f"# {line}\n" for line in note.splitlines())
    path = Path(path)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def config_on_zoo(config: MergeConfig, zoo: Zoo) -> MergeConfig:
    """The same config with every model reference pointed at the folder of that name in ``zoo``."""
    from ..config import config_from_dict

    data = config.model_dump(exclude_defaults=True, mode="json")
    if data.get("base_model"):
        data["base_model"] = zoo.path(Path(data["base_model"]).name)
    for entry in data["models"]:
        entry["model"] = zoo.path(Path(entry["model"]).name)
    return config_from_dict(data, source="evolved config")
