"""The ctypes side of the kernels' boundary: one ``ctypes.Structure`` per parameter struct of ``kernels.h``.

Each ``_fields_`` lists the fields of the C struct of the same name, in the same order. The compiled library reports
every struct's size and every field's name, offset and size (``ms_sizeof``, ``ms_field``), and ``mismatches``
compares them with these mirrors, so that a field added, moved or retyped on one side only stops the kernels from
loading instead of feeding them garbage. Every kernel is called as ``ms_<kernel>(&args, begin, end)``: one struct
per band, shared by the threads, and the range of the band each one computes.
"""

from __future__ import annotations

import ctypes

_p, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_pointers = ctypes.POINTER(ctypes.c_void_p)
_codes = ctypes.POINTER(ctypes.c_int32)
_floats = ctypes.POINTER(ctypes.c_float)
_int64s = ctypes.POINTER(ctypes.c_int64)


class KernelArgs(ctypes.Structure):
    """A kernel's parameters; ``c_name`` is the C typedef it mirrors."""

    c_name = ""


class WeightedSumArgs(KernelArgs):
    c_name = "ms_weighted_sum_args"
    _fields_ = [("x", _pointers), ("dt", _codes), ("c", _floats), ("out", _p), ("m", _i32), ("out_dt", _i32),
                ("divide", _f32)]


class TaskVectorsArgs(KernelArgs):
    c_name = "ms_task_vectors_args"
    _fields_ = [("base", _p), ("x", _pointers), ("dt", _codes), ("w", _floats), ("scale", _floats),
                ("thr", _floats), ("tie_end", _int64s), ("keys", ctypes.POINTER(ctypes.c_uint64)),
                ("keep24", ctypes.POINTER(ctypes.c_uint32)), ("out", _p), ("start", _i64), ("m", _i32),
                ("base_dt", _i32), ("out_dt", _i32), ("mode", _i32), ("has_drop", _i32), ("consensus", _i32),
                ("normalize", _i32), ("divisor", _f32), ("lam", _f32)]


class MagnitudeArgs(KernelArgs):
    c_name = "ms_magnitude_args"
    _fields_ = [("base", _p), ("x", _p), ("ties", _i64), ("base_dt", _i32), ("dt", _i32), ("lo", _f32),
                ("hi", _f32), ("out", _p), ("stride", _i64)]


class BracketFound(KernelArgs):
    c_name = "ms_bracket_found"
    _fields_ = [("values", _p), ("cap", _i64), ("above", _i64), ("inside", _i64)]


class RandomL1Args(KernelArgs):
    c_name = "ms_random_l1_args"
    _fields_ = [("base", _p), ("x", _p), ("before", _p), ("after", _p), ("key", ctypes.c_uint64), ("start", _i64),
                ("keep24", ctypes.c_uint32), ("base_dt", _i32), ("dt", _i32)]


class EmrArgs(KernelArgs):
    c_name = "ms_emr_args"
    _fields_ = [("base", _p), ("x", _pointers), ("dt", _codes), ("tau_out", _p), ("masks", _pointers),
                ("sums", _p), ("m", _i32), ("base_dt", _i32), ("tau_dt", _i32)]


class RowSumsArgs(KernelArgs):
    c_name = "ms_row_sums_args"
    _fields_ = [("base", _p), ("x", _pointers), ("dt", _codes), ("thr", _floats), ("tie_end", _int64s),
                ("merged", _p), ("uni", _p), ("out", _p), ("cols", _i64), ("m", _i32), ("base_dt", _i32),
                ("emr", _i32), ("merged_dt", _i32), ("uni_dt", _i32)]


STRUCTS: tuple[type[KernelArgs], ...] = (WeightedSumArgs, TaskVectorsArgs, MagnitudeArgs, BracketFound,
                                          RandomL1Args, EmrArgs, RowSumsArgs)

# kernel: (its struct, what follows (args, begin, end), what it returns)
KERNELS = {
    "ms_weighted_sum": (WeightedSumArgs, [], _i64),
    "ms_task_vectors": (TaskVectorsArgs, [], _i64),
    "ms_bracket": (MagnitudeArgs, [ctypes.POINTER(BracketFound)], None),
    "ms_tie_end": (MagnitudeArgs, [], _i64),
    "ms_count_nonfinite": (MagnitudeArgs, [], _i64),
    "ms_strided_magnitudes": (MagnitudeArgs, [], None),
    "ms_random_l1": (RandomL1Args, [], None),
    "ms_emr": (EmrArgs, [], None),
    "ms_row_sums": (RowSumsArgs, [], None),
}


def _c_fields(lib: ctypes.CDLL, name: bytes) -> list[tuple[str, int, int]]:
    offset, size, fields = ctypes.c_size_t(), ctypes.c_size_t(), []
    while (field := lib.ms_field(name, len(fields), ctypes.byref(offset), ctypes.byref(size))) is not None:
        fields.append((field.decode(), offset.value, size.value))
    return fields


def mismatches(lib: ctypes.CDLL, structs: tuple[type[KernelArgs], ...] = STRUCTS) -> list[str]:
    """How the library's structs differ from ``structs`` (empty when they agree field for field)."""
    try:
        lib.ms_sizeof.argtypes, lib.ms_sizeof.restype = [ctypes.c_char_p], ctypes.c_size_t
        lib.ms_field.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t),
                                 ctypes.POINTER(ctypes.c_size_t)]
        lib.ms_field.restype = ctypes.c_char_p
    except AttributeError as exc:
        return [f"the library does not describe its structs ({exc})"]
    problems = []
    for struct in structs:
        name = struct.c_name.encode()
        c_size = lib.ms_sizeof(name)
        if c_size == 0:
            problems.append(f"{struct.c_name} is not in the library")
            continue
        if c_size != ctypes.sizeof(struct):
            problems.append(f"{struct.c_name} is {c_size} bytes in C, {ctypes.sizeof(struct)} in Python")
        ours = [(field, getattr(struct, field).offset, getattr(struct, field).size) for field, _ in struct._fields_]
        theirs = _c_fields(lib, name)
        if ours != theirs:
            differ = next((f"C {c} vs Python {p}" for c, p in zip(theirs, ours) if c != p),
                          f"{len(theirs)} fields in C, {len(ours)} in Python")
            problems.append(f"{struct.c_name}'s fields differ (name, offset, size): {differ}")
    return problems


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give every kernel its argument and result types (and the row-sums layout queries theirs)."""
    for kernel, (struct, extra, result) in KERNELS.items():
        function = getattr(lib, kernel)
        function.argtypes = [ctypes.POINTER(struct), _i64, _i64, *extra]
        function.restype = result
    lib.ms_row_sums_fields.argtypes, lib.ms_row_sums_fields.restype = [], ctypes.c_int
    lib.ms_row_sums_field.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.ms_row_sums_field.restype = ctypes.c_char_p
    lib.ms_row_sums_layout.argtypes, lib.ms_row_sums_layout.restype = [ctypes.c_int, _int64s], _i64
    return lib
