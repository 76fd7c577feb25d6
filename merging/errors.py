"""Typed errors: each carries a one-line message a user can act on."""


class MergeError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class ConfigError(MergeError):
    """The merge configuration is invalid."""


class SourceError(MergeError):
    """A checkpoint cannot be found or read."""


class CompatibilityError(MergeError):
    """The inputs do not fit together (missing tensors, shapes, dtypes)."""


class Cancelled(MergeError):
    """The user cancelled the job; nothing was left behind."""
