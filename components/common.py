"""What every panel shares: how errors are shown, the app's settings, parsing the YAML, opening the Hub.

Handlers are thin: they parse the YAML config, call one function of ``merging``, and format the result. On the page
a failure is shown in the panel where it happened, in its status line, and stays there (``failure``): a library
error (``MergeError``) in the words of the CLI's ``error:`` line, logged on the server as one line; anything else
is a bug, logged with its traceback and shown as one line. The API endpoints raise instead (``user_errors``:
``gr.Error``, which gradio_client reports), logged the same way.
"""

import functools
import html
import inspect
import ipaddress
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from merging.config import MergeConfig, parse_config
from merging.errors import ConfigError, MergeError

log = logging.getLogger("mergescope.app")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_html(message: str) -> str:
    """A status line for a failure: ``error: <message>`` as the CLI prints it, quotes kept, `code` as code, nothing
    else read as Markdown or HTML."""
    parts = re.split(r"`([^`]+)`", one_line(message))
    body = "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))
    return f'<div class="status-error" role="alert">error: {body}</div>'


def failure(where: str, exc: Exception) -> str:
    """The status line of a failed action in panel ``where``; user errors logged as one line, bugs with traceback."""
    if isinstance(exc, MergeError):
        log.info("%s: %s", where, one_line(str(exc)))
        return error_html(str(exc))
    log.exception("internal error in %s", where)
    return error_html(f"internal error ({type(exc).__name__}: {exc}); the server log has the details")


def user_errors(fn: Callable) -> Callable:
    """For API endpoints: MergeError becomes gr.Error (its one-line message, logged as one line) and bugs a one-line
    gr.Error; keeps the signature (Gradio reads it for gr.Progress, gr.Request and gr.OAuthToken parameters) and
    generator-ness."""

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            log.info("%s: %s", fn.__name__, one_line(exc.message))
            return gr.Error(exc.message, print_exception=False)
        if isinstance(exc, MergeError):
            log.info("%s: %s", fn.__name__, one_line(str(exc)))
            return gr.Error(str(exc), print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(f"internal error ({type(exc).__name__}: {exc}); the server log has the details",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                raise translate(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            raise translate(exc) from None
    return wrapper


@dataclass
class AppSettings:
    """Knobs set once at start-up (flags and environment), read by the panels."""

    on_space: bool = field(default_factory=lambda: bool(os.environ.get("SPACE_ID")))
    allow_local_paths: bool = True  # off on a Space: only the demo models and the session's uploads
    allowed_roots: list[Path] = field(default_factory=list)  # always readable local folders (demo models)
    max_upload_bytes: int = 200 * 1024 * 1024
    archive_limit_bytes: int = 2 * 1024 ** 3  # build a zip of all outputs only below this size
    merge_concurrency: int = 1
    sample_threshold_bytes: int = 2 * 1024 ** 3  # analyses of bigger inputs are sampled by default
    tensor_delay_s: float = 0.0  # test-only throttle: seconds slept after each merged or analyzed tensor

    @classmethod
    def from_env(cls, *, host: str | None = None, share: bool = False, **overrides: Any) -> "AppSettings":
        """Settings from the environment; ``host``/``share`` are the launch's: a server reachable from other
        machines (not loopback, or a share link) is public, like a Space: no local paths unless the env says so."""
        settings = cls()
        env = os.environ
        if "MERGESCOPE_ALLOW_LOCAL_PATHS" in env:
            settings.allow_local_paths = env["MERGESCOPE_ALLOW_LOCAL_PATHS"].lower() in ("1", "true", "yes")
        else:
            settings.allow_local_paths = not settings.on_space and is_loopback(host) and not share
        if env.get("MERGESCOPE_MERGE_CONCURRENCY"):
            settings.merge_concurrency = max(1, int(env["MERGESCOPE_MERGE_CONCURRENCY"]))
        if env.get("MERGESCOPE_TEST_TENSOR_DELAY_S"):
            settings.tensor_delay_s = float(env["MERGESCOPE_TEST_TENSOR_DELAY_S"])
        for key, value in overrides.items():
            setattr(settings, key, value)
        return settings


def is_loopback(host: str | None) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only (None: Gradio's default, loopback)."""
    if not host:
        return True
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0's spellings) that others may reach


def hf_token(oauth_token: Any = None) -> str | None:
    """The token for Hub calls: on a Space the signed-in visitor's (or none: never the Space owner's), locally
    HF_TOKEN or the stored login (Gradio's local OAuth token is a mock string, useless for the Hub)."""
    if os.environ.get("SPACE_ID"):
        return getattr(oauth_token, "token", None) if oauth_token is not None else None
    return os.environ.get("HF_TOKEN") or None


def drop_space_owner_token(settings: "AppSettings") -> bool:
    """On a Space, remove HF_TOKEN from the environment unless MERGESCOPE_USE_SPACE_TOKEN=1: the library falls back
    to it when a call has no token, and a visitor must never read or push with the Space owner's account."""
    if settings.on_space and os.environ.get("HF_TOKEN") and os.environ.get("MERGESCOPE_USE_SPACE_TOKEN") != "1":
        del os.environ["HF_TOKEN"]
        log.warning("HF_TOKEN removed from the environment: visitors act with their own login only "
                    "(set MERGESCOPE_USE_SPACE_TOKEN=1 to share the Space's token for reads and pushes)")
        return True
    return False


def hub_resolver(token: str | None = None):
    """How model references that are not local paths are opened (the Hub), or None while merging.hub is absent."""
    try:
        from merging.hub import hub_resolver as make_resolver
    except ImportError:
        return None
    return make_resolver(token=token)


def load_config(text: str | None, settings: AppSettings, extra_roots: list[Path] = ()) -> MergeConfig:
    """Parse and validate the YAML, then check its local paths against the app's policy."""
    if not text or not text.strip():
        raise ConfigError("config: empty; pick models and a method, or paste a YAML config")
    config = parse_config(text, source="config")
    check_local_paths(config, settings, extra_roots)
    return config


def check_local_paths(config: MergeConfig, settings: AppSettings, extra_roots: list[Path] = ()) -> None:
    """On a Space, a path on the server's disk may only point at the demo models or the session's own uploads."""
    if settings.allow_local_paths:
        return
    roots = [r.resolve() for r in [*settings.allowed_roots, *extra_roots]]
    for ref in config.model_refs():
        if ref.startswith(("/", ".", "~")) or os.path.exists(ref):
            real = Path(os.path.expanduser(ref)).resolve()
            if not any(real == r or r in real.parents for r in roots):
                raise ConfigError(f"config: {ref}: local paths are disabled on this server; "
                                  "use a Hub repo id, the demo models or an upload")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_text(p: Any, verb: str = "merging") -> str:
    """'merging: 12/57 tensors · 1.2 MB of 3.4 MB · 3 s left' from an engine Progress (merge or analysis)."""
    phase = "reduction pass" if getattr(p, "phase", "") == "reduce" else verb
    return (f"{phase}: {p.tensors_done}/{p.tensors_total} tensors · {human_bytes(p.bytes_done)} of "
            f"{human_bytes(p.bytes_total)} · {human_seconds(p.eta_s)} left")


def human_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
