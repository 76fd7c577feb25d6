"""The one small interface every checkpoint source offers: names, specs, read(name[, rows]), files."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

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


def frozen_specs(specs: dict[str, TensorSpec]) -> Mapping[str, TensorSpec]:
    """A source's specs as it hands them out: built once, read-only (every lookup is O(1), none copies them)."""
    return MappingProxyType(specs)


class CheckpointSource(ABC):
    """A checkpoint's tensors, read one at a time."""

    label: str  # the reference as the user wrote it
    read_concurrency: int = 1  # reads worth running at once (a Hub checkpoint: its connection limit)

    @abstractmethod
    def specs(self) -> Mapping[str, TensorSpec]:
        """Every tensor's dtype and shape, by name, in file order: the same read-only mapping on every call (the
        planner and the engine look tensors up in it once per tensor, so building it per call would make a
        checkpoint of n tensors cost n² to plan)."""

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


class SourceView(CheckpointSource):
    """Another checkpoint's tensors seen differently (renamed, fused, re-indexed): subclasses set ``_specs`` and
    ``read``; side files, counters, notes and closing are the wrapped source's."""

    def __init__(self, source: CheckpointSource) -> None:
        self.label = source.label
        self._src = source

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def file_names(self) -> list[str]:
        return self._src.file_names()

    def read_file(self, filename: str) -> bytes | None:
        return self._src.read_file(filename)

    def bytes_read(self) -> int:
        return self._src.bytes_read()

    def notes(self) -> list[str]:
        return self._src.notes()

    def close(self) -> None:
        self._src.close()
