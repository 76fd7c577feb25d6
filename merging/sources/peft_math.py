"""The arithmetic of PEFT's LoRA family, as ``merge_and_unload()`` does it, on float32 tensors.

    ΔW = s · B @ A                       linear (``fan_in_fan_out``: stored transposed, GPT-2's Conv1D)
    ΔW = s · (B @ A)ᵀ                    embedding (A: r × vocab, B: dim × r)
    ΔW = s · (B ⊗ A)                     convolution: B's 1×1 kernels times A's kernels
    W' = W + ΔW                          LoRA
    W' = m · (W + ΔW) / ‖W + ΔW‖         DoRA: the norm of each output unit's weights (a row of a linear layer, a
                                         column of an embedding or of a transposed Conv1D, a kernel of a conv)
    b' = b + s · b_B                     ``lora_bias``: lora_B's own bias
    W'[i] = δ_i                          trainable tokens: rows replaced

with s = lora_alpha / r, or lora_alpha / √r under rsLoRA.
"""

from __future__ import annotations

import math
import re

import torch


def scale(cfg: dict, module: str, rank: int) -> float:
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", rank))
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def pattern_value(patterns: dict, module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return value
    return default


def delta(a: torch.Tensor, b: torch.Tensor, embedding: bool, shape: tuple[int, ...], s: float,
          fan_in_fan_out: bool) -> tuple[torch.Tensor, bool]:
    """s · ΔW laid out like the stored weight of ``shape``, and whether the weight is stored transposed
    (embeddings; ``fan_in_fan_out``, which a square weight needs to tell apart)."""
    if embedding:  # A: (r, vocab), B: (dim, r): ΔW = (B @ A)ᵀ, a row per token
        return (b @ a).T * s, True
    if a.dim() > 2:  # a convolution: A (r, in, *k), B (out, r, 1...)
        return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * s, False
    plain, flipped = (b.shape[0], a.shape[1]) == tuple(shape), (a.shape[1], b.shape[0]) == tuple(shape)
    if flipped and (fan_in_fan_out or not plain):  # stored (in, out), as GPT-2's Conv1D
        return (b @ a).T * s, True
    return (b @ a) * s, False


def dora(weight: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """m · (W + ΔW) / ‖W + ΔW‖ on the whole tensor; the norm is per output unit (axis 1 when stored transposed)."""
    merged = weight + update
    m = magnitude.reshape(-1)
    if transposed:
        norm = torch.linalg.norm(merged, dim=0)
        return merged * (m / norm).reshape(1, -1)
    norm = merged.flatten(1).norm(dim=1)
    return merged * (m / norm).reshape(-1, *([1] * (merged.dim() - 1)))


def token_indices(cfg: dict, module: str) -> list[int] | None:
    """The rows a trainable-tokens adapter replaces in ``module`` (a list applies to the input embedding)."""
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for key, value in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in value]
    return None
