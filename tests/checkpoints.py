"""Real checkpoints for tests: llama-shaped safetensors folders written into a temp dir.

``write_checkpoint`` builds the same tensor names as transformers' LlamaForCausalLM, so the same folders serve
our engine and mergekit. A fine-tune is the base plus seeded noise of a given scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(hidden: int = 16, intermediate: int = 32, layers: int = 2, vocab: int = 64, heads: int = 2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu",
    }


def llama_tensors(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random llama weights; every call with the same seed gives the same tensors."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    t = {"model.embed_tokens.weight": rnd(v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            t[f"{p}self_attn.{proj}_proj.weight"] = rnd(h, h)
        t[f"{p}mlp.gate_proj.weight"] = rnd(i, h)
        t[f"{p}mlp.up_proj.weight"] = rnd(i, h)
        t[f"{p}mlp.down_proj.weight"] = rnd(h, i)
        t[f"{p}input_layernorm.weight"] = (1 + rnd(h).float() * 0.1).to(dtype)
        t[f"{p}post_attention_layernorm.weight"] = (1 + rnd(h).float() * 0.1).to(dtype)
    t["model.norm.weight"] = (1 + rnd(h).float() * 0.1).to(dtype)
    t["lm_head.weight"] = rnd(v, h)
    return t


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
