"""The zoo's data: scikit-learn's bundled 8×8 digits (no download), fixed splits, and the task definitions.

The 1,797 images are split once by a seeded permutation into train / validation / test (60 / 15 / 25 %). Every
task sees the same images in the same split; a task changes the *input domain* (rotated, mirrored, inverted,
noisy, shifted digits) or the *label space* (parity, greater than 4), as the papers' vision setting merges models
fine-tuned on different datasets. The pre-training objective differs from every task, as CLIP's does from its
downstream datasets: the digit modulo 5 (0 and 5 share a class, 1 and 6, ...) on the training images of every
task's input domain. So the base
has useful features for everything but has finished none of the tasks: a linear probe on it scores about 0.65–0.85,
each fine-tune about 0.8–0.96.

Everything here is a pure function of (task, split, seed): the same arrays on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import MergeError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"test": 0.25, "val": 0.15}  # the rest is train
DEFAULT_SEED = 0
NUM_CLASSES_MAX = 10  # every head has 10 rows so all zoo checkpoints share names and shapes


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: how inputs are transformed and labels mapped."""

    name: str
    description: str
    num_classes: int
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # (N, 8, 8) in [0, 1] → same shape
    label: Callable[[np.ndarray], np.ndarray]  # digit 0–9 → class index


def _same(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x


def _rotated(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(x, k=1, axes=(1, 2))


def _mirrored(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[:, :, ::-1]


def _inverted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


def _noisy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, 0.25, size=x.shape), 0.0, 1.0)


def _shifted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Two pixels down and right, zero-filled: the digit partly leaves the frame.
    out = np.zeros_like(x)
    out[:, 2:, 2:] = x[:, :-2, :-2]
    return out


def _identity(y: np.ndarray) -> np.ndarray:
    return y


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", "which digit (0–9)", 10, _same, _identity),
    Task("parity", "is the digit odd", 2, _same, lambda y: y % 2),
    Task("greater4", "is the digit greater than 4", 2, _same, lambda y: (y > 4).astype(np.int64)),
    Task("rotated", "which digit, images rotated 90°", 10, _rotated, _identity),
    Task("mirrored", "which digit, images mirrored left–right", 10, _mirrored, _identity),
    Task("inverted", "which digit, ink and paper swapped", 10, _inverted, _identity),
    Task("noisy", "which digit, strong Gaussian pixel noise", 10, _noisy, _identity),
    Task("shifted", "which digit, images shifted 2 px down and right", 10, _shifted, _identity),
)}
PRETRAIN = Task("pretrain", "the digit modulo 5, on the images of every task's domain", 5, _same, lambda y: y % 5)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MergeError("the demo zoo needs scikit-learn for its bundled digits (pip install scikit-learn)") from None
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    return images, bunch.target.astype(np.int64)


@lru_cache(maxsize=4)
def split_indices(seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Indices of each split: a seeded permutation cut 25 % test, 15 % validation, 60 % train."""
    n = len(_digits()[1])
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * SPLIT_FRACTIONS["test"]))
    n_val = int(round(n * SPLIT_FRACTIONS["val"]))
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


def get_task(name: str) -> Task:
    if name == PRETRAIN.name:
        return PRETRAIN
    try:
        return TASKS[name]
    except KeyError:
        raise MergeError(f"zoo: unknown task {name!r} (tasks: {', '.join(TASKS)})") from None


@lru_cache(maxsize=64)
def _task_arrays(task_name: str, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise MergeError(f"zoo: unknown split {split!r} (use train, val or test)")
    task = get_task(task_name)
    images, digits = _digits()
    idx = split_indices(seed)[split]
    # A generator per (task, split, seed): noisy inputs are the same on every call.
    rng = np.random.default_rng([seed, SPLITS.index(split), sorted([*TASKS, PRETRAIN.name]).index(task_name)])
    if task is PRETRAIN:
        # Every input domain of the tasks (each transform once), all with the pre-training labels.
        transforms = list({id(t.transform): t.transform for t in TASKS.values()}.values())
        x = np.concatenate([f(images[idx], rng) for f in transforms])
        y = np.tile(task.label(digits[idx]), len(transforms))
    else:
        x, y = task.transform(images[idx], rng), task.label(digits[idx])
    return np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), 64), y.astype(np.int64)


def task_data(task_name: str, split: str, seed: int = DEFAULT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (N, 64) float32 in [0, 1], labels (N,) int64) of one task on one split."""
    x, y = _task_arrays(task_name, split, seed)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
