"""The frontier rows' free settings, chosen on the zoo's validation split only (the test split is never read here).

Each paper leaves a scale (λ or α) and sometimes another setting to be picked on held-out data; ``tune`` does so by
a grid search on the average validation accuracy over the tasks, each merge a real config run through the library,
and ``python -m merging zoo tune`` writes the winners to ``<zoo>/tuned.json`` (committed, like ``evolved.yml``), which
``zoo table`` reads. Consensus merging follows its paper's two steps: each task's TALL-mask λ_t is picked on that
task's own validation accuracy with its masked model θ_base + m_t ⊙ Σ_i τ_i, then α for the consensus merge (k = 2).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .eval import Zoo, average, evaluate_state
from .merges import merged_tensors, zoo_config
from .model import HEAD_PREFIX
from .train import single_thread

SPLIT = "val"
TUNED_FILE = "tuned.json"
SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # the grid of the TALL-masks paper's code

# row key: (method, fixed parameters, {free parameter: candidates}); searched over every combination
SEARCHES: dict[str, tuple[str, dict[str, Any], dict[str, tuple]]] = {
    "tsv_m": ("tsv_m", {}, {"lambda": SCALES}),
    "iso_c": ("iso_c", {}, {"lambda": SCALES}),
    "iso_cts": ("iso_cts", {"common_fraction": 0.8}, {"lambda": SCALES}),
    "cart": ("cart", {}, {"rank_fraction": (0.04, 0.08, 0.16, 0.32, 0.5), "lambda": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)}),
    "pcb": ("pcb", {"pcb_scope": "model"}, {"ratio": (0.02, 0.05, 0.1, 0.2), "lambda": SCALES}),
    "lines_ta": ("task_arithmetic", {"lambda": 1.0, "lines": "on", "lines_alpha_from": "norm_ratio"},
                 {"lines_beta": (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)}),
    "consensus": ("consensus", {"k": 2}, {"lambda": SCALES}),
}


def validation_average(zoo: Zoo, method: str, params: dict, model_params: list[dict] | None = None) -> float:
    config = zoo_config(zoo, method, params, model_params)
    return average(evaluate_state(zoo, merged_tensors(config, zoo), zoo.tasks, SPLIT))


def grid(fixed: dict, free: dict[str, tuple]) -> list[dict]:
    names = list(free)
    return [{**fixed, **dict(zip(names, values))} for values in itertools.product(*(free[n] for n in names))]


def tall_lambdas(zoo: Zoo, candidates: tuple[float, ...] = TALL_LAMBDAS) -> list[float]:
    """Each task's TALL-mask λ_t, the one whose masked model θ_base + m_t ⊙ Σ_i τ_i, m_t = [|τ_t| > λ_t |Σ_i τ_i −
    τ_t|], scores best on that task's validation data (Wang et al. 2024, §3; heads are each task's own)."""
    base = zoo.state("base")
    body = [k for k in base if not k.startswith(HEAD_PREFIX) and base[k].is_floating_point()]
    taus = {t: {k: zoo.state(t)[k] - base[k] for k in body} for t in zoo.tasks}
    total = {k: sum(taus[t][k] for t in zoo.tasks) for k in body}
    chosen = []
    for task in zoo.tasks:
        scores = []
        for lam in candidates:
            state = dict(base)
            for k in body:
                state[k] = base[k] + total[k] * (taus[task][k].abs() > lam * (total[k] - taus[task][k]).abs())
            scores.append(evaluate_state(zoo, state, [task], SPLIT)[task])
        chosen.append(candidates[int(torch.tensor(scores).argmax())])
    return chosen


def tune(zoo: Zoo, keys: list[str] | None = None, searches: dict | None = None,
         log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The best validation setting of each row in ``keys`` (default: all of ``SEARCHES``)."""
    searches = searches or SEARCHES
    out = {}
    with single_thread():
        for key in keys or list(searches):
            started = time.monotonic()
            method, fixed, free = searches[key]
            model_params = None
            if method == "consensus":
                model_params = [{"tall_lambda": lam} for lam in tall_lambdas(zoo)]
            tried = [(validation_average(zoo, method, params, model_params), i, params)
                     for i, params in enumerate(grid(fixed, free))]
            best, _, params = max(tried, key=lambda x: (x[0], -x[1]))  # ties: the first in grid order
            out[key] = {"method": method, "parameters": params, "model_parameters": model_params,
                        "val_average": best, "candidates": len(tried), "split": SPLIT}
            if log:
                log(f"{key}: validation {100 * best:.1f} % at {params} ({len(tried)} merges, "
                    f"{time.monotonic() - started:.1f} s)")
    return out


def read_tuned(zoo: Zoo) -> dict[str, dict]:
    path = zoo.root / TUNED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_tuned(results: dict[str, dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path
