"""Real checkpoints for tests: llama-shaped safetensors folders written into a temp dir.

``write_checkpoint`` builds the same tensor names as transformers' LlamaForCausalLM, so the same folders serve
our engine and mergekit. A fine-tune is the base plus seeded noise of a given scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from merging import synthetic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(hidden: int = 16, intermediate: int = 32, layers: int = 2, vocab: int = 64, heads: int = 2) -> dict:
    return synthetic.llama_config(hidden, intermediate, layers, vocab, heads, max_positions=128)


def llama_tensors(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random llama weights; every call with the same seed gives the same tensors."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    return {name: (1 + rnd(*shape).float() * 0.1).to(dtype) if len(shape) == 1 else rnd(*shape)
            for name, shape in synthetic.llama_shapes(cfg)}


def fine_tune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """The base plus seeded Gaussian noise on every float tensor."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict | None = None,
                    shards: int = 1) -> Path:
    """Write a transformers-layout folder: model.safetensors, or ``shards`` files plus the index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def write_family(root: Path, n_models: int = 3, dtype: str = "float32", layers: int = 2, hidden: int = 16,
                 intermediate: int = 32, vocab: int = 64, shards: int = 1, scale: float = 0.01,
                 seed: int = 0) -> tuple[Path, list[Path]]:
    """A base and ``n_models`` fine-tunes of it under ``root``; returns (base folder, fine-tune folders)."""
    cfg = llama_config(hidden, intermediate, layers, vocab)
    cfg["torch_dtype"] = dtype
    base = llama_tensors(cfg, seed, DTYPES[dtype])
    base_dir = save_checkpoint(Path(root) / "base", base, cfg, shards)
    tunes = [save_checkpoint(Path(root) / f"ft{k}", fine_tune(base, seed * 100 + k, scale), cfg, shards)
             for k in range(n_models)]
    return base_dir, tunes


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single or sharded), for comparing results in tests."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
