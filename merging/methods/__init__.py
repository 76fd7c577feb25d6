"""Merge methods: importing this package registers every method."""

from . import linear  # noqa: F401  (registers)
from . import interpolation, passthrough, task_vectors  # noqa: F401  (register)
from . import emr  # noqa: F401  (registers emr and emr_rescale; after the methods it can unify with)
from .registry import REGISTRY, MergeMethod, Param, TensorContext, get_method, register

__all__ = ["REGISTRY", "MergeMethod", "Param", "TensorContext", "get_method", "register"]
