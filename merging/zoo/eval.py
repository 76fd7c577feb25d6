"""Scoring any checkpoint on the zoo's tasks: a merge, a fine-tune, an EMR-extracted task model.

A merged body is scored on task t with task t's own head, taken from t's fine-tune folder (the head is never merged,
as in the papers' vision setting): accuracy = mean over the split of [argmax of the first C_t logits = label].
The zoo's checkpoints are read once and kept (``Zoo``): a few hundred kilobytes each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SourceError
from .data import TASKS, task_data
from .model import HEAD_PREFIX, build_model, load_state, read_config
from .train import DEFAULT_ZOO_DIR, MLP_TASK, single_thread


class Zoo:
    """The committed zoo folder: its checkpoints' tensors (read on first use) and configs."""

    def __init__(self, root: str | Path = DEFAULT_ZOO_DIR, seed: int | None = None) -> None:
        self.root = Path(root)
        if not (self.root / "base" / "model.safetensors").is_file():
            raise SourceError(f"{self.root}: no zoo here (run `python -m merging zoo build` to create it)")
        self.config = read_config(self.root / "base")
        self.seed = self.config.get("seed", 0) if seed is None else seed
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tasks(self) -> list[str]:
        """The task fine-tunes present, in the order data.TASKS defines them."""
        return [t for t in TASKS if (self.root / t / "model.safetensors").is_file()]

    def path(self, name: str) -> str:
        return str(self.root / name)

    def state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._states:
            self._states[name] = load_state(self.root / name)
        return self._states[name]

    def head(self, task: str) -> dict[str, torch.Tensor]:
        """The task's classification head (``head.weight``, ``head.bias``) from its fine-tune."""
        state = self.state(task)
        return {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}

    def data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return task_data(task, split, self.seed)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    with torch.no_grad():
        logits = model(x)[:, :num_classes]
    return float((logits.argmax(dim=1) == y).float().mean())


def evaluate_state(zoo: Zoo, state: dict[str, torch.Tensor], tasks: list[str] | None = None, split: str = "test",
                   config: dict | None = None) -> dict[str, float]:
    """Accuracy per task of a ViT body (``state``), each task scored with its own head."""
    config = config or zoo.config
    results = {}
    model = build_model(config, state)
    with single_thread():  # a few hundred 64-pixel images: one thread is fastest
        for task in tasks or zoo.tasks:
            model.load_state_dict(zoo.head(task), strict=False)
            x, y = zoo.data(task, split)
            results[task] = accuracy(model, x, y, TASKS[task].num_classes)
    return results


def evaluate_checkpoint(folder: str | Path, zoo: Zoo | None = None, tasks: list[str] | None = None,
                        split: str = "test") -> dict[str, float]:
    """Accuracy per task of any checkpoint folder holding a zoo model (ViT: every task; MLP: digit identity)."""
    zoo = zoo or Zoo()
    if (Path(folder) / "emr.json").is_file():
        raise SourceError(f"{folder}: an EMR merge holds one unified task vector and per-task masks, not a model; "
                          "rebuild a task first: python -m merging emr-extract MERGED --task NAME OUT")
    config = read_config(folder)
    state = load_state(folder)
    if (config.get("architectures") or [""])[0] == "DigitMLP":
        x, y = zoo.data(MLP_TASK, split)
        return {MLP_TASK: accuracy(build_model(config, state), x, y, 10)}
    return evaluate_state(zoo, state, tasks, split, config)


def average(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")
