"""Training the zoo, deterministically: a pre-trained base, one fine-tune per task, and MLPs for Git Re-Basin.

The recipe follows the papers' vision setting (Ilharco et al. 2023; Huang et al. 2024): every task starts from the
same pre-trained base; its classification head is fitted first on the frozen base's features (a linear probe, the
stand-in for CLIP's zero-shot head) and then *frozen* while the body is fine-tuned. So a task vector lives in the
body only, the base with a task's head is that task's "zero-shot" model, and a merged body is scored with each
task's own head.

Determinism: each model is initialized and its batches drawn from generators seeded by (seed, role); training runs
single-threaded with ``torch.use_deterministic_algorithms(True)``, so the same seed writes the same bytes.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import PRETRAIN, TASKS, task_data
from .model import DigitMLP, DigitViT, model_config, save_checkpoint

DEFAULT_ZOO_DIR = Path(__file__).resolve().parent.parent.parent / "assets" / "zoo"
MLP_NAMES = ("mlp_a", "mlp_b")
MLP_TASK = "digits"


@dataclass(frozen=True)
class Steps:
    """Optimizer steps per phase; ``scaled(f)`` shrinks them all for quick test builds."""

    pretrain: int = 1200
    probe: int = 150
    fine_tune: int = 400
    mlp: int = 800

    def scaled(self, factor: float) -> Steps:
        return Steps(*(max(1, int(round(v * factor))) for v in (self.pretrain, self.probe, self.fine_tune, self.mlp)))


_ZOO_LOCK = threading.RLock()


@contextlib.contextmanager
def single_thread():
    """One zoo computation at a time, on one intra-op thread, the previous thread count put back afterwards.

    One thread because the zoo's tensors are tiny: on a busy 2-core machine two OpenMP threads wait on each other
    (a λ update of the Learn view took ~1 s instead of ~0.1 s). The lock serialises callers: two interleaving
    save/restore pairs would otherwise leave the whole process (and the app's merges) on one thread.
    """
    with _ZOO_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def deterministic():
    """Single-threaded, deterministic kernels for the duration (the build); the previous settings are restored."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with single_thread():
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def role_seed(seed: int, role: str) -> int:
    """A seed per (build seed, model role), stable across Python runs (no ``hash()``)."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(role))


def train_classifier(model: nn.Module, parameters: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                     num_classes: int, steps: int, lr: float, batch: int, seed: int) -> None:
    """Adam on cross-entropy over the first ``num_classes`` logits, minibatches drawn from a seeded generator, the
    learning rate decayed to zero on a cosine."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(parameters, lr=lr)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx])[:, :num_classes], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def pretrain_base(seed: int, steps: Steps) -> DigitViT:
    """The base every task starts from, pre-trained on data.PRETRAIN (the digit modulo 5); its head has 5 used rows."""
    torch.manual_seed(role_seed(seed, "base-init"))
    model = DigitViT()
    x, y = task_data(PRETRAIN.name, "train", seed)
    train_classifier(model, list(model.parameters()), x, y, PRETRAIN.num_classes, steps.pretrain, 3e-3, 64,
                     role_seed(seed, "base"))
    return model


def fit_probe(model: DigitViT, task_name: str, seed: int, steps: int) -> None:
    """Replace the head by a linear probe on the frozen body's features (rows past num_classes stay zero)."""
    task = TASKS[task_name]
    x, y = task_data(task_name, "train", seed)
    with torch.no_grad():
        feats = model.features(x)
    head = nn.Linear(feats.shape[1], task.num_classes)
    torch.manual_seed(role_seed(seed, f"probe-init-{task_name}"))
    head.reset_parameters()
    gen = torch.Generator().manual_seed(role_seed(seed, f"probe-{task_name}"))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(head(feats[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[: task.num_classes] = head.weight
        model.head.bias[: task.num_classes] = head.bias


def fine_tune_all(base: DigitViT, task_names: list[str], seed: int, steps: Steps, lr: float = 1e-3,
                  batch: int = 64) -> list[DigitViT]:
    """Each task: a linear probe, then the body fine-tuned with that head frozen (Adam, cosine decay).

    The fine-tunes are independent, but trained side by side in one vectorized step (``torch.func.vmap`` over the
    stacked parameters; Adam is elementwise, so this is exactly separate training), which makes the zoo build
    several times faster on a CPU. Each task draws its own minibatches from its own seeded generator.
    """
    from torch.func import functional_call, stack_module_state, vmap

    models = []
    for name in task_names:
        model = DigitViT(base.config)
        model.load_state_dict(base.state_dict())
        fit_probe(model, name, seed, steps.probe)
        models.append(model)
    params, _ = stack_module_state(models)  # name → (T, *shape), leaf tensors requiring grad
    body = {k: v for k, v in params.items() if not k.startswith("head.")}
    heads = {k: v.detach() for k, v in params.items() if k.startswith("head.")}
    data = [task_data(name, "train", seed) for name in task_names]
    # Logits past a task's class count get -inf-like offsets: softmax over the first C_t logits only.
    offsets = torch.zeros(len(task_names), base.config["num_classes"])
    for i, name in enumerate(task_names):
        offsets[i, TASKS[name].num_classes:] = -1e9
    gens = [torch.Generator().manual_seed(role_seed(seed, f"fine-tune-{name}")) for name in task_names]
    template = models[0]

    def loss_one(body_params, head_params, x, y, offset):
        logits = functional_call(template, {**body_params, **head_params}, (x,)) + offset
        return nn.functional.cross_entropy(logits, y)

    batched_loss = vmap(loss_one)
    opt = torch.optim.Adam(list(body.values()), lr=lr)
    for step in range(steps.fine_tune):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps.fine_tune))
        idx = [torch.randint(len(x), (batch,), generator=g) for (x, _), g in zip(data, gens)]
        xb = torch.stack([x[i] for (x, _), i in zip(data, idx)])
        yb = torch.stack([y[i] for (_, y), i in zip(data, idx)])
        # The sum of independent losses: each model's gradient is its own loss's gradient.
        loss = batched_loss(body, heads, xb, yb, offsets).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i, model in enumerate(models):
            model.load_state_dict({k: v[i] for k, v in {**body, **heads}.items()})
            model.eval()
    return models


def train_mlp(name: str, seed: int, steps: Steps) -> DigitMLP:
    """An MLP on digit identity from its own random initialization (the Re-Basin setting)."""
    torch.manual_seed(role_seed(seed, f"{name}-init"))
    model = DigitMLP()
    x, y = task_data(MLP_TASK, "train", seed)
    train_classifier(model, list(model.parameters()), x, y, 10, steps.mlp, 1e-3, 64, role_seed(seed, name))
    return model


def build(out_dir: str | Path = DEFAULT_ZOO_DIR, *, seed: int = 0, steps: Steps | None = None,
          tasks: list[str] | None = None, mlps: tuple[str, ...] = MLP_NAMES, log=None) -> dict:
    """Train the whole zoo and write it under ``out_dir`` (base/, one folder per task, mlp_a/, mlp_b/).

    Returns {"seconds": ..., "folders": [...], "bytes": ...}. Existing model folders of the same names are replaced.
    """
    steps = steps or Steps()
    tasks = list(tasks or TASKS)
    out = Path(out_dir)
    started = time.monotonic()
    folders = []

    def write(model: nn.Module, name: str, **extra) -> None:
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        save_checkpoint(model, folder, model_config(model, seed=seed, **extra))
        folders.append(folder)
        if log:
            log(f"{name}: written ({time.monotonic() - started:.1f} s)")

    with deterministic():
        base = pretrain_base(seed, steps)
        write(base, "base", task=PRETRAIN.name, task_classes=PRETRAIN.num_classes, description=PRETRAIN.description)
        for name, model in zip(tasks, fine_tune_all(base, tasks, seed, steps)):
            write(model, name, task=name, task_classes=TASKS[name].num_classes,
                  description=TASKS[name].description, fine_tuned_from="base")
        for name in mlps:
            write(train_mlp(name, seed, steps), name, task=MLP_TASK, task_classes=10,
                  description=f"digit identity from random initialization {name}")
    size = sum(f.stat().st_size for folder in folders for f in folder.iterdir())
    return {"seconds": time.monotonic() - started, "folders": [str(f) for f in folders], "bytes": size}
