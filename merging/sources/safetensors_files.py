"""A checkpoint made of one or more safetensors files, read through positioned reads.

Local files and HTTP range requests share this code: only the ``ByteReader`` differs.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from ..errors import SourceError
from ..limits import MAX_TENSORS
from ..safetensors_io import TensorInfo, parse_header, tensor_from_bytes
from .base import CheckpointSource, TensorSpec, frozen_specs


def uninitialized_bytes(n: int) -> torch.Tensor:
    """A uint8 tensor of ``n`` bytes left unfilled (a bytearray is zeroed first: a whole extra pass over memory)."""
    return torch.empty(n, dtype=torch.uint8)


def writable_view(buffer: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU uint8 tensor's bytes (for preadv); valid while the tensor lives."""
    return memoryview((ctypes.c_ubyte * buffer.numel()).from_address(buffer.data_ptr())).cast("B")


class ByteReader(ABC):
    """Random access to the bytes of one file."""

    label: str
    size: int

    @abstractmethod
    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``; raise SourceError if the file is shorter."""

    def read_many(self, parts: list[tuple[int, memoryview]]) -> None:
        """Fill each (offset, buffer) of ``parts``; a reader over a network sends them at once."""
        for offset, view in parts:
            self.read_into(offset, view)

    def read_at(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        pass


class LocalFile(ByteReader):
    def __init__(self, path: str) -> None:
        self.label = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise SourceError(f"{path}: cannot be opened ({exc.strerror})") from None
        self.size = os.fstat(self._fd).st_size

    def read_into(self, offset: int, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            n = os.preadv(self._fd, [buffer[done:]], offset + done)
            if n == 0:
                raise SourceError(f"{self.label}: file ended early at byte {offset + done}; it was truncated or "
                                  "changed while reading")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsCheckpoint(CheckpointSource):
    """Tensors spread over safetensors files; ``weight_map`` says which file holds which tensor."""

    def __init__(self, label: str, readers: dict[str, ByteReader],
                 side_files: dict[str, callable] | None = None) -> None:
        self.label = label
        self._readers = readers
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, str] = {}
        self._side = side_files or {}
        self._read_bytes = 0
        self._lock = threading.Lock()
        for fname, reader in readers.items():
            where = f"{label}/{fname}" if len(readers) > 1 or fname else label
            infos, _ = parse_header(reader.read_at, reader.size, where)
            if len(self._infos) + len(infos) > MAX_TENSORS:
                raise SourceError(f"{label}: its files hold more than {MAX_TENSORS:,} tensors, the most read from "
                                  "one checkpoint")
            for name, info in infos.items():
                if name in self._infos:
                    raise SourceError(f"{label}: tensor {name!r} appears in both {self._where[name]} and {fname}")
                self._infos[name] = info
                self._where[name] = fname
        if not self._infos:
            raise SourceError(f"{label}: the checkpoint holds no tensors")
        self._specs = frozen_specs({n: TensorSpec(i.dtype, i.shape) for n, i in self._infos.items()})

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self._infos.get(name)
        if info is None:
            raise SourceError(f"{self.label}: has no tensor {name!r}")
        start, end, count = info.start, info.end, None
        if rows is not None:
            lo, hi = rows
            if not info.shape or not 0 <= lo <= hi <= info.shape[0]:
                raise SourceError(f"{self.label}: rows {rows} are outside tensor {name!r} of shape {list(info.shape)}")
            start, end, count = info.start + lo * info.row_bytes, info.start + hi * info.row_bytes, hi - lo
        buf = uninitialized_bytes(end - start)
        if end > start:
            self._readers[self._where[name]].read_into(start, writable_view(buf))
        with self._lock:
            self._read_bytes += end - start
        return tensor_from_bytes(info, buf, count)

    def read_rows(self, name: str, indices: list[int]) -> torch.Tensor:
        """Selected rows (sorted, each once), read into one buffer: one range per run of consecutive rows, every
        range of the tensor asked for at once (on the Hub, requests in flight together)."""
        info = self._infos.get(name)
        rows = sorted(set(indices))
        if info is None or not info.shape or not rows or rows != sorted(indices) or rows[0] < 0 \
                or rows[-1] >= info.shape[0]:
            return super().read_rows(name, indices)  # errors and odd requests as the generic path gives them
        runs, start = [], rows[0]
        for prev, row in zip(rows, rows[1:] + [None]):
            if row != prev + 1:
                runs.append((start, prev + 1))
                start = row
        step = info.row_bytes
        buf = uninitialized_bytes(len(rows) * step)
        view, parts, at = writable_view(buf) if buf.numel() else memoryview(b""), [], 0
        for lo, hi in runs:
            parts.append((info.start + lo * step, view[at:at + (hi - lo) * step]))
            at += (hi - lo) * step
        if step:
            self._readers[self._where[name]].read_many(parts)
        with self._lock:
            self._read_bytes += len(rows) * step
        return tensor_from_bytes(info, buf, len(rows))

    def bytes_read(self) -> int:
        return self._read_bytes

    def file_names(self) -> list[str]:
        return sorted(self._side)

    def read_file(self, filename: str) -> bytes | None:
        loader = self._side.get(filename)
        return loader() if loader else None

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def shard_files_from_index(index_bytes: bytes, label: str) -> list[str]:
    """The shard file names listed by a ``model.safetensors.index.json``."""
    try:
        index = json.loads(index_bytes)
        weight_map = index["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SourceError(f"{label}: model.safetensors.index.json has no valid `weight_map`") from None
    for f in files:
        if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith("."):
            raise SourceError(f"{label}: index names an unsafe shard file {f!r}")
    return files
