"""The safetensors file format, read and written without loading whole files.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{dtype, shape, data_offsets}``, then the raw bytes. We parse the header ourselves so that every way a file can
be broken (truncated, offsets out of bounds or overlapping, sizes not matching shapes) becomes one clear message,
and so that a tensor, or a band of its rows, is read with a single positioned read: no memory map grows the
resident set, and the same code serves local files and HTTP range requests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import SourceError
from .limits import MAX_TENSORS

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


DTYPE_SIZES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def dtype_size(dtype: str) -> int:
    """Bytes per element (a dict lookup: it is asked several times per tensor of every model)."""
    return DTYPE_SIZES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file, and what it is."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // rows if rows else 0


def parse_header(read_at: Callable[[int, int], bytes], file_size: int,
                 label: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors header; ``read_at(offset, length)`` supplies bytes.

    Returns the tensors by name and the ``__metadata__`` mapping. Every inconsistency raises a SourceError that
    names ``label`` (the file) and the problem.
    """
    if file_size < 8:
        raise SourceError(f"{label}: not a safetensors file (only {file_size} bytes)")
    (header_len,) = struct.unpack("<Q", read_at(0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise SourceError(f"{label}: header of {header_len} bytes is larger than the {MAX_HEADER_BYTES} allowed")
    if 8 + header_len > file_size:
        raise SourceError(f"{label}: header length {header_len} runs past the end of the file ({file_size} "
                          "bytes); the file is truncated or not safetensors")
    try:
        header = json.loads(read_at(8, header_len))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, integers over 4300 digits, deep nesting
        raise SourceError(f"{label}: the header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{label}: the header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:  # + __metadata__
        raise SourceError(f"{label}: the header lists {len(header) - 1:,} tensors or more; at most {MAX_TENSORS:,} "
                          "are read from one checkpoint")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SourceError(f"{label}: __metadata__ is not a mapping")
    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry, data_start, data_size, label)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise SourceError(f"{label}: tensors {name_a!r} and {name_b!r} overlap in the file")
    return tensors, metadata


def _tensor_info(name: str, entry: object, data_start: int, data_size: int, label: str) -> TensorInfo:
    where = f"{label}: tensor {name[:80]!r}"
    if not name or len(name) > 1024 or any(c in name for c in "/\\\0") or not name.isprintable():
        raise SourceError(f"{where}: tensor names must be 1-1024 printable characters without path separators")
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object is unhashable
        raise SourceError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SourceError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise SourceError(f"{where}: data offsets {offsets} lie outside the file's {data_size} data bytes")
    expected = math.prod(shape) * dtype_size(dtype)
    if end - begin != expected:
        raise SourceError(f"{where}: holds {end - begin} bytes but shape {shape} in {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_local_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Parse the header of a safetensors file on disk."""
    label = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return parse_header(lambda off, n: _pread_exact(f.fileno(), off, n, label), size, label)
    except OSError as exc:
        raise SourceError(f"{label}: cannot be read ({exc.strerror})") from None


def _pread_exact(fd: int, offset: int, length: int, label: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise SourceError(f"{label}: file ended early (wanted {length} bytes at offset {offset})")
    return data


def tensor_from_bytes(info: TensorInfo, buffer: bytearray | memoryview | torch.Tensor,
                      rows: int | None = None) -> torch.Tensor:
    """Interpret raw little-endian bytes (a buffer, or a uint8 tensor) as ``info``'s tensor (or its first ``rows``
    rows), without copying."""
    shape = info.shape if rows is None else (rows, *info.shape[1:])
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=DTYPES[info.dtype])
    if isinstance(buffer, torch.Tensor):
        return buffer.view(DTYPES[info.dtype]).reshape(shape)
    return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(shape)


def header_bytes(entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict | None = None) -> tuple[bytes, list[int]]:
    """Build a header for tensors written in the given order; returns it and each tensor's data offset.

    The header is padded with spaces to a multiple of 8 bytes so that the data stays aligned.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    offsets = []
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype_size(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous, on the CPU), without a copy where possible."""
    t = tensor.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors to one safetensors file (small outputs: EMR modulators, tests)."""
    entries = [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    head, _ = header_bytes(entries, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            f.write(tensor_bytes(t))
