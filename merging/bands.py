"""How a streaming pass cuts its work: row bands of a tensor, and what stays in memory between a tensor's passes.

The engine runs element-wise methods and copies band by band; the resource estimate (``merging.resources``) and the
analysis cut tensors the same way, so all three read these constants and ``row_bands``.
"""

from __future__ import annotations

# Element-wise methods and copies run in row bands of about this many elements (16 MB of float32 per input).
BAND_ELEMENTS = 1 << 22

# A tensor whose stored inputs total at most this stays in memory from its first statistics pass to its merge
# pass (TIES reads it once instead of three times); larger ones are read again, from the page cache.
HOLD_BYTES = 256 << 20

Band = tuple[int, int] | None  # (first row, row after the last), or None for the whole tensor


def is_elementwise(plan) -> bool:
    """Whether the plan's method may run on row bands (its ``elementwise`` flag, or that function of the plan)."""
    elementwise = plan.method.elementwise
    return bool(elementwise(plan) if callable(elementwise) else elementwise)


def row_bands(task, elementwise: bool) -> list[Band]:
    """Row bands of about BAND_ELEMENTS for element-wise methods and copies; [None] means the whole tensor.

    Every band but the last is a multiple of 8 rows, so each starts and ends on a whole byte of a 1-bit packed
    output (EMR's masks).
    """
    shape = task.spec.shape
    banded = (task.copy or elementwise) and task.shared_rows is None and len(shape) >= 1
    row = task.spec.numel // shape[0] if shape and shape[0] else 0
    if not banded or task.spec.numel <= BAND_ELEMENTS or row == 0:
        return [None]
    step = max(8, BAND_ELEMENTS // row // 8 * 8)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def unit_elements(task, elementwise: bool) -> int:
    """The most elements of ``task`` processed at once: its largest band, or the whole tensor."""
    bands = row_bands(task, elementwise)
    if bands == [None]:
        return task.spec.numel
    row = task.spec.numel // task.spec.shape[0]
    return max(stop - start for start, stop in bands) * row
