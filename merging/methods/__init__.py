"""Merge methods: every module of this package is imported here, and each registers its methods.

A method added in a new file under ``merging/methods/`` (one function and one ``register(MergeMethod(...))``)
therefore appears in ``python -m merging methods``, the CLI, the app's form and the generic tests; ``python -m
merging methods --update-readme`` puts it in the README's table.
"""

import importlib
import pkgutil

from .registry import REGISTRY, MergeMethod, Param, Preset, StatsPass, TensorContext, get_method, register

# Modules that register nothing themselves; importing them first keeps registration order independent of them.
_HELPERS = ("registry", "coefficients", "selection", "docs", "global_topk", "sparsify", "lines", "lowrank")


def _import_all() -> None:
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        if module not in _HELPERS:
            importlib.import_module(f"{__name__}.{module}")


_import_all()

__all__ = ["REGISTRY", "MergeMethod", "Param", "Preset", "StatsPass", "TensorContext", "get_method", "register"]
