"""Demo checkpoints the app opens on, so a new user sees charts and a merge without choosing anything.

The built-in demo zoo (``assets/zoo``: a small ViT on digits with task fine-tunes) is used when it is there.
Otherwise ``ensure_demo_models`` writes a small llama-shaped family into a cache folder once: a base and four
"fine-tunes" whose task vectors are built so that the diagnostics have something to show,

    τ_k(layer ℓ) = s_k · ( a(ℓ) · shared + (1 − a(ℓ)) · own_k ),   a(ℓ) = 1 − ℓ / (L − 1) · 0.9

a direction all tasks share, dominant in the early layers, and one of each task's own, dominant in the late layers:
so the fine-tunes agree early and fight late (the sign-conflict rate rises with depth), and their scales ``s_k``
differ (task-vector norms and NAN coefficients differ per model). Everything is seeded: same bytes on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .safetensors_io import save_file
from .synthetic import llama_config, llama_shapes

DEMO_TASKS: dict[str, float] = {"math": 0.010, "code": 0.016, "chat": 0.006, "translate": 0.012}
DEMO_SHAPE = {"hidden": 64, "intermediate": 128, "layers": 6, "vocab": 256, "heads": 4}
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoModels:
    """A base and its fine-tunes, plus the method and parameters the app starts with."""

    name: str
    base: str
    models: dict[str, str]  # task name -> checkpoint folder
    method: str = "ties"
    parameters: dict = field(default_factory=lambda: {"lambda": 1.0})
    model_parameters: dict = field(default_factory=lambda: {"weight": 1.0, "density": 0.5})

    def config_dict(self) -> dict:
        """A mergekit-style config for these models (plain data, ready for YAML)."""
        return {
            "merge_method": self.method,
            "base_model": self.base,
            "models": [{"model": path, "parameters": dict(self.model_parameters)} for path in self.models.values()],
            "parameters": dict(self.parameters),
        }


def default_cache_dir() -> Path:
    """Where generated demo checkpoints live: $MERGESCOPE_CACHE, else $XDG_CACHE_HOME/mergescope."""
    if os.environ.get("MERGESCOPE_CACHE"):
        return Path(os.environ["MERGESCOPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergescope"


def zoo_models(root: Path | None = None) -> DemoModels | None:
    """The committed demo zoo (``assets/zoo``), when it holds a base and at least two task fine-tunes."""
    root = Path(root) if root else _REPO_ROOT / "assets" / "zoo"
    for family in ([root] + sorted(p for p in root.iterdir() if p.is_dir())) if root.is_dir() else []:
        base = _first_checkpoint(family, ("base", "pretrained", "pre-trained"))
        tasks_root = family / "tasks" if (family / "tasks").is_dir() else family
        if base is None:
            continue
        tasks = {p.name: str(p) for p in sorted(tasks_root.iterdir())
                 if p.is_dir() and p != base and _is_checkpoint(p)
                 and not p.name.startswith(("base", "mlp", "rebasin"))}  # the MLPs are Git Re-Basin's, not tasks
        if len(tasks) >= 2:
            return DemoModels(f"zoo: {family.name}", _short_path(base), {k: _short_path(v) for k, v in tasks.items()},
                              "ties", {"lambda": 1.0}, {"weight": 1.0, "density": 0.2})
    return None


def _short_path(path: str | Path) -> str:
    """``assets/zoo/base`` rather than an absolute path when it lies under the working directory (as on a Space):
    configs read better and stay valid on another machine with the same checkout."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


def _is_checkpoint(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _first_checkpoint(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if _is_checkpoint(folder / name):
            return folder / name
    return None


def ensure_demo_models(cache_dir: str | os.PathLike | None = None, *, prefer_zoo: bool = True) -> DemoModels:
    """The demo zoo when it exists, else the llama-shaped demo family (written on first use, then reused)."""
    if prefer_zoo:
        zoo = zoo_models()
        if zoo is not None:
            return zoo
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"demo-llama-{_recipe_hash()}"
    if not (folder / "done").exists():
        _write_family(folder)
    return DemoModels("demo llama (4 tasks)", str(folder / "base"),
                      {task: str(folder / f"ft-{task}") for task in DEMO_TASKS})


def _recipe_hash() -> str:
    recipe = json.dumps({"tasks": DEMO_TASKS, "shape": DEMO_SHAPE, "version": 1}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:10]


def _llama_config() -> dict:
    d = DEMO_SHAPE
    return llama_config(d["hidden"], d["intermediate"], d["layers"], d["vocab"], d["heads"], max_positions=256)


def _base_tensors(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights scaled by fan-in; norms near 1 (drawn in file order, so the family is reproducible)."""
    return {name: (1 + 0.05 * torch.randn(*shape, generator=gen)) if len(shape) == 1
            else torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
            for name, shape in llama_shapes(cfg)}


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def _write_family(folder: Path) -> None:
    """Write base and fine-tunes into a sibling temp folder, then rename: concurrent starts never see half a family."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cfg = _llama_config()
        gen = torch.Generator().manual_seed(20240)
        base = _base_tensors(cfg, gen)
        shared = {n: torch.randn(t.shape, generator=gen) for n, t in base.items()}
        layers = cfg["num_hidden_layers"]
        _save(tmp / "base", base, cfg)
        for k, (task, scale) in enumerate(DEMO_TASKS.items()):
            own_gen = torch.Generator().manual_seed(1000 + k)
            tuned = {}
            for name, theta in base.items():
                layer = _layer_of(name)
                agree = 0.3 if layer is None else 1 - 0.9 * layer / max(1, layers - 1)
                own = torch.randn(theta.shape, generator=own_gen)
                tuned[name] = theta + scale * (agree * shared[name] + (1 - agree) * own)
            _save(tmp / f"ft-{task}", tuned, cfg)
        (tmp / "done").write_text("ok\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "done").exists():  # someone else finished first: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({n: t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors", {"format": "pt"})
