"""The zoo's two architectures, in plain torch: a small ViT for merging, a small MLP for Git Re-Basin.

DigitViT: the 8×8 image is cut into 2×2 patches (16 tokens of 4 pixels), embedded linearly, given a learned
position embedding, passed through pre-norm transformer blocks (``blocks.N.``, so merging/plan.py's
``layer_index`` sees the layers), mean-pooled, normalized and classified by ``head``. The head is per task and
never merged (as in the papers' vision setting): it always has 10 rows so that every checkpoint of the zoo has the
same tensor names and shapes; a task with fewer classes uses only its first rows (the rest stay zero).

DigitMLP: 64 → 32 → 32 → 32 → 10 with ReLU, tensors ``layers.N.weight``/``layers.N.bias``: narrow and deep enough
that interpolating two of them collapses the hidden units' variance (what REPAIR repairs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import SourceError
from ..safetensors_io import save_file

VIT_DEFAULTS = {"dim": 32, "num_layers": 4, "num_heads": 2, "mlp_dim": 64, "patch": 2, "image": 8,
                "num_classes": 10}
MLP_DEFAULTS = {"width": 32, "num_layers": 4, "inputs": 64, "num_classes": 10}
HEAD_PREFIX = "head."


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitViT(nn.Module):
    """A four-block ViT on 8×8 digits: 16 patch tokens of 2×2 pixels, mean pooling, a 10-row head."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = {**VIT_DEFAULTS, **(config or {})}
        self.config = cfg
        self.patch = cfg["patch"]
        tokens = (cfg["image"] // self.patch) ** 2
        self.patch_embed = nn.Linear(self.patch * self.patch, cfg["dim"])
        self.pos_embed = nn.Parameter(torch.randn(tokens, cfg["dim"]) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg["dim"], cfg["num_heads"], cfg["mlp_dim"])
                                    for _ in range(cfg["num_layers"]))
        self.norm = nn.LayerNorm(cfg["dim"])
        self.head = nn.Linear(cfg["dim"], cfg["num_classes"])

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 64) pixels → (B, 16, 4): row-major 2×2 patches."""
        side, p = self.config["image"], self.patch
        x = x.reshape(-1, side // p, p, side // p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], -1, p * p)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.patches(x)) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitMLP(nn.Module):
    """64 → width → … → 10 with ReLU (``num_layers`` linear maps in ``layers``)."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = {**MLP_DEFAULTS, **(config or {})}
        self.config = cfg
        widths = [cfg["inputs"]] + [cfg["width"]] * (cfg["num_layers"] - 1) + [cfg["num_classes"]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor, return_preactivations: bool = False):
        pre = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                pre.append(x)
                x = torch.relu(x)
        return (x, pre) if return_preactivations else x


ARCHITECTURES = {"DigitViT": DigitViT, "DigitMLP": DigitMLP}


def model_config(model: nn.Module, **extra) -> dict:
    """The config.json of a zoo checkpoint: architecture, shape, and what it was trained on."""
    name = type(model).__name__
    return {"architectures": [name], "model_type": "digit_vit" if name == "DigitViT" else "digit_mlp",
            **model.config, "torch_dtype": "float32", **extra}


def save_checkpoint(model: nn.Module, folder: str | Path, config: dict) -> Path:
    """Write ``model.safetensors`` (tensors in name order) and ``config.json``; same model → same bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(model.state_dict().items())}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder or file (any layout the library reads), as float32."""
    from ..sources import open_source

    with open_source(str(folder)) as src:
        return {name: src.read(name).to(torch.float32).clone() for name in src.specs()}


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{folder}: has no config.json (a zoo checkpoint needs one)") from None
    except ValueError:
        raise SourceError(f"{path}: is not valid JSON") from None


def build_model(config: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The zoo model a config.json describes, with ``state`` loaded (strictly) when given."""
    arch = (config.get("architectures") or [None])[0]
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise SourceError(f"config.json: architecture {arch!r} is not a zoo model ({', '.join(ARCHITECTURES)})")
    keys = VIT_DEFAULTS if cls is DigitViT else MLP_DEFAULTS
    model = cls({k: config[k] for k in keys if k in config})
    if state is not None:
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise SourceError(f"checkpoint: missing zoo tensors {sorted(missing)[:4]}")
        model.load_state_dict({k: state[k] for k in model.state_dict()})
    model.eval()
    return model


def load_model(folder: str | Path) -> nn.Module:
    return build_model(read_config(folder), load_state(folder))
