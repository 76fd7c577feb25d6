"""The ambient token: what huggingface_hub would use when a call is given none, and how a public server drops it.

huggingface_hub finds a token on its own (``get_token``): an OIDC exchange when ``HF_OIDC_RESOURCE`` is set (with
``HF_OIDC_ID_TOKEN``), then ``HF_TOKEN``, then ``HUGGING_FACE_HUB_TOKEN``, then the stored login of ``hf auth login``
(the file ``HF_TOKEN_PATH``, by default ``$HF_HOME/token``, and ``stored_tokens`` beside it), then a Colab secret.
On a Space that token is the owner's, and a visitor who is not signed in must never act with it, so there the
library uses the token a call passes (the visitor's OAuth login) or none (``ambient_allowed``), unless the owner
opts in with ``MERGESCOPE_USE_SPACE_TOKEN=1``.

``drop_ambient_tokens`` goes further for a server process: it removes every one of those variables from the
environment, points huggingface_hub's stored-login paths at ``/dev/null`` and turns off its implicit token, and
overwrites the variables' bytes in the process's original environment block. ``os.environ`` and ``unsetenv`` only
drop the C ``environ`` array's pointer; the strings the kernel put on the stack at ``exec`` stay there, and
``/proc/<pid>/environ`` (readable by the same user, by a core dump, by a debugger) reads them from that block.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("mergescope.hub")

OPT_IN = "MERGESCOPE_USE_SPACE_TOKEN"
# Every variable huggingface_hub 2.x reads a token from, or exchanges for one.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN")


def on_space() -> bool:
    """Whether this process serves a Hugging Face Space (or says it does: ``SPACE_ID`` alone is enough here)."""
    return bool(os.environ.get("SPACE_ID"))


def ambient_allowed() -> bool:
    """Whether a call without a token may fall back to the environment and the stored login: anywhere but on a
    Space, and there only when the owner opted in."""
    return not on_space() or os.environ.get(OPT_IN) == "1"


def drop_ambient_tokens() -> list[str]:
    """Remove the ambient token from this process: the variables (also from /proc/self/environ), the stored login
    and huggingface_hub's implicit use of it. Returns what was dropped (names only, never values)."""
    dropped = [name for name in TOKEN_VARIABLES if os.environ.get(name)]
    for name in TOKEN_VARIABLES:
        os.environ.pop(name, None)
    scrubbed = scrub_process_environ(TOKEN_VARIABLES)
    if dropped and not scrubbed:
        log.warning("could not overwrite the dropped token in /proc/self/environ (it is gone from os.environ)")
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency
        constants = None
    stored = [p for p in (getattr(constants, "HF_TOKEN_PATH", None), getattr(constants, "HF_STORED_TOKENS_PATH", None))
              if p and os.path.isfile(p)]
    if stored:
        dropped.append("the stored login")
    os.environ["HF_TOKEN_PATH"] = os.devnull  # for child processes too
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    if constants is not None:
        constants.HF_TOKEN_PATH = os.devnull
        constants.HF_STORED_TOKENS_PATH = os.devnull
        constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
    return dropped


def scrub_process_environ(names: tuple[str, ...]) -> bool:
    """Overwrite ``NAME=value`` of each of ``names`` with NUL bytes in the environment block the kernel set up at
    exec (what /proc/self/environ shows). Call it after the names left ``os.environ``: nothing points at those
    bytes then. True when the block was found (Linux), whether or not it held any of them."""
    area = _environment_block()
    if area is None:
        return False
    start, end = area
    try:
        block = ctypes.string_at(start, end - start)
    except (OSError, ValueError):  # pragma: no cover - the kernel gave the range of our own mapping
        return False
    offset = 0
    wanted = tuple(n.encode() + b"=" for n in names)
    for entry in block.split(b"\0"):
        if entry.startswith(wanted):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1
    return True


def _environment_block() -> tuple[int, int] | None:
    """(env_start, env_end) of this process, fields 50 and 51 of /proc/self/stat; None where there is none."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        start, end = int(fields[47]), int(fields[48])
    except (OSError, ValueError, IndexError):
        return None
    return (start, end) if 0 < start < end else None
