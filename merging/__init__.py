"""Mergescope's library: merge fine-tuned checkpoints, streamed tensor by tensor, and explain the merge.

Nothing here imports a UI toolkit; the app and the CLI call these same functions.
"""

from .config import MergeConfig, load_config, parse_config
from .engine import MergeResult, Progress, plan_merge, run_merge
from .errors import CompatibilityError, ConfigError, MergeError, SourceError

__all__ = ["MergeConfig", "MergeResult", "Progress", "load_config", "parse_config", "plan_merge", "run_merge",
           "MergeError", "ConfigError", "SourceError", "CompatibilityError"]
