"""Mergescope's library: merge fine-tuned checkpoints, streamed tensor by tensor, and explain the merge.

Nothing here imports a UI toolkit; the app and the CLI call these same functions. The names below are loaded on
first use, so that ``import merging.errors`` (or the CLI's ``--help``) does not pay for torch and the engine.
"""

import importlib

_EXPORTS = {
    "MergeConfig": "config", "load_config": "config", "parse_config": "config",
    "MergeResult": "engine", "Progress": "engine", "plan_merge": "engine", "run_merge": "engine",
    "MergeError": "errors", "ConfigError": "errors", "SourceError": "errors", "CompatibilityError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'merging' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
