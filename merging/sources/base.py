"""The one small interface every checkpoint source offers: names, specs, read(name[, rows]), files."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..safetensors_io import FLOAT_DTYPES, dtype_size


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, wherever it lives."""

    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class CheckpointSource(ABC):
    """A checkpoint's tensors, read one at a time."""

    label: str  # the reference as the user wrote it

    @abstractmethod
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor's dtype and shape, by name, in file order."""

    @abstractmethod
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor in its stored dtype, or the band ``rows=(start, stop)`` of its first dimension."""

    def read_rows(self, name: str, indices: list[int]) -> torch.Tensor:
        """Selected rows of a tensor, read as contiguous bands."""
        bands = []
        start = prev = None
        for i in sorted(indices):
            if start is None:
                start = prev = i
            elif i == prev + 1:
                prev = i
            else:
                bands.append((start, prev + 1))
                start = prev = i
        if start is not None:
            bands.append((start, prev + 1))
        return torch.cat([self.read(name, band) for band in bands]) if bands else self.read(name, (0, 0))

    def read_file(self, filename: str) -> bytes | None:
        """A side file (config.json, tokenizer files), or None when the checkpoint has none."""
        return None

    def file_names(self) -> list[str]:
        """Side files this checkpoint offers to copy."""
        return []

    def bytes_read(self) -> int:
        """How many tensor bytes this source has read so far (for reports and tests)."""
        return 0

    def notes(self) -> list[str]:
        """What a user should know about how this source is read (an adapter's base, a fused layout)."""
        return []

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
