"""DARE's random draws: a counter-based hash of (key, flat element index), the torch twin of ``draw24`` in
kernels.c. Each element's draw depends only on the seed, the tensor, the model and the element's position, so a
band, a range or a whole tensor computed on any number of threads gets the same mask.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF
ONE24 = 1 << 24


class DrawSite(Protocol):
    """Where draws are made: what a method's ``TensorContext`` says of the tensor (or band) it is merging."""

    seed: int
    name: str
    band: tuple[int, int] | None
    shape: tuple[int, ...]


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name) that is the same in every process and on every machine (not ``hash``)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def model_key(ctx: DrawSite, model: int) -> int:
    """The 64-bit key of model ``model``'s draws on this tensor."""
    return stable_seed(ctx.seed, f"{ctx.name}#{model}")


def keep_limit(density: float) -> int:
    """An entry is kept when its 24-bit draw is below this: probability ``density`` (to 2^-24)."""
    return max(0, min(ONE24, round(density * ONE24)))


def first_index(ctx: DrawSite) -> int:
    """The flat index, in the whole tensor, of the first element of the band ``ctx`` describes."""
    if not ctx.band or not ctx.shape or ctx.shape[0] == 0:
        return 0
    row = 1
    for size in ctx.shape[1:]:
        row *= size
    return ctx.band[0] * row


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic on values below 2^32: products wrap modulo 2^64, and the low 32 bits are kept.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def draw24(key: int, first: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """24-bit draws (int64) for element indices first .. first + n - 1 under ``key``."""
    index = torch.arange(first, first + n, dtype=torch.int64, device=device)
    low, high = index & MASK32, index >> 32
    h = _mix32((low * GOLDEN + (key & MASK32)) & MASK32)
    h = _mix32(h ^ high ^ ((key >> 32) & MASK32))
    return h >> 8


def keep_mask(ctx: DrawSite, model: int, shape: torch.Size | tuple[int, ...], density: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask for model ``model`` on this band: each entry kept with probability ``density``."""
    n = 1
    for size in shape:
        n *= size
    draws = draw24(model_key(ctx, model), first_index(ctx), n, device)
    return (draws < keep_limit(density)).reshape(shape)
