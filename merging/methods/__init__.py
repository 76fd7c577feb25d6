"""Merge methods: importing this package registers every method."""

from . import linear  # noqa: F401  (registers)
from .registry import REGISTRY, MergeMethod, Param, TensorContext, get_method, register

__all__ = ["REGISTRY", "MergeMethod", "Param", "TensorContext", "get_method", "register"]
