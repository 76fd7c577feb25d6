"""Merges of the zoo through the library: the same configs, validation, engine and registered methods as the CLI.

``zoo_config`` writes the config a user would write (base = the zoo's base, models = its task fine-tunes);
``merged_tensors`` runs it with ``run_merge`` and hands back the tensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig, config_from_dict
from ..engine import run_merge
from ..methods import REGISTRY
from .eval import Zoo
from .model import load_state


def zoo_config(zoo: Zoo, method: str, parameters: dict[str, Any] | None = None,
               model_parameters: dict[str, dict[str, Any]] | list[dict[str, Any]] | None = None,
               tasks: list[str] | None = None, seed: int = 0) -> MergeConfig:
    """A merge config over the zoo's task fine-tunes (base = the pre-trained base), validated by the library.

    ``model_parameters``: per task name (a dict) or one dict for every model (a list is taken positionally).
    """
    tasks = tasks or zoo.tasks
    models = []
    for i, task in enumerate(tasks):
        if isinstance(model_parameters, dict) and task in model_parameters:
            params = model_parameters[task]
        elif isinstance(model_parameters, list):
            params = model_parameters[i]
        else:
            params = {}
        models.append({"model": zoo.path(task), "parameters": dict(params)})
    data = {"merge_method": method, "base_model": zoo.path("base"), "models": models,
            "parameters": dict(parameters or {}), "seed": seed}
    return config_from_dict(data, source=f"zoo {method} config")


def is_registered(method: str) -> bool:
    return method in REGISTRY


def merged_tensors(config: MergeConfig, zoo: Zoo) -> dict[str, torch.Tensor]:
    """Run ``config`` with the library's ``run_merge`` into a temporary folder and return the merged tensors.

    The public engine entry point, not its internals: a row of the table is exactly what
    ``python -m merging merge`` writes for the same YAML. The zoo is small, so the round trip costs milliseconds.
    """
    with tempfile.TemporaryDirectory(prefix="zoo-merge-") as tmp:
        out = Path(tmp) / "merged"
        run_merge(config, out, device="cpu")
        return load_state(out)
