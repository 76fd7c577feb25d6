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
from merging.hub.ambient import OPT_IN, drop_ambient_tokens, on_space
from merging.writer import parse_size

from .names import expand_names, redact_paths, short_name, side_refs

log = logging.getLogger("mergescope.app")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_html(message: str) -> str:
    """A status line for a failure: ``error: <message>`` as the CLI prints it, quotes kept, `code` as code, nothing
    else read as Markdown or HTML."""
    parts = re.split(r"`([^`]+)`", one_line(message))
    body = "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))
    return f'<div class="status-error" role="alert">error: {body}</div>'


def failure(where: str, exc: Exception, settings: "AppSettings | None" = None) -> str:
    """The status line of a failed action in panel ``where``; user errors logged as one line, bugs with traceback.
    With ``settings`` of a public server, server paths in the message become the visitor's names (``redact``)."""
    redact = settings.redact if settings is not None else str
    if isinstance(exc, MergeError):
        log.info("%s: %s", where, one_line(str(exc)))
        return error_html(redact(str(exc)))
    log.exception("internal error in %s", where)
    return error_html(redact(f"internal error ({type(exc).__name__}: {exc}); the server log has the details"))


def user_errors(fn: Callable | None = None, *, settings: "AppSettings | None" = None) -> Callable:
    """For API endpoints: MergeError becomes gr.Error (its one-line message, logged as one line) and bugs a one-line
    gr.Error; keeps the signature (Gradio reads it for gr.Progress, gr.Request and gr.OAuthToken parameters) and
    generator-ness. ``user_errors(settings=...)``: messages redacted as ``failure`` does."""
    if fn is None:
        return functools.partial(user_errors, settings=settings)
    redact = settings.redact if settings is not None else str

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            log.info("%s: %s", fn.__name__, one_line(exc.message))
            return gr.Error(redact(exc.message), print_exception=False)
        if isinstance(exc, MergeError):
            log.info("%s: %s", fn.__name__, one_line(str(exc)))
            return gr.Error(redact(str(exc)), print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(redact(f"internal error ({type(exc).__name__}: {exc}); the server log has the details"),
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

    on_space: bool = field(default_factory=on_space)  # SPACE_ID set: a public server, whatever else is set
    login: bool = field(default_factory=lambda: space_login())  # Gradio's Sign-in button works (a real Space)
    allow_local_paths: bool = True  # off on a Space: only the demo models and the session's uploads
    allowed_roots: list[Path] = field(default_factory=list)  # always readable local folders (demo models)
    max_upload_bytes: int = 200 * 1024 * 1024
    session_quota_bytes: int | None = 20 * 1000 ** 3  # uploads + outputs per session (MERGESCOPE_SESSION_QUOTA)
    api_idle_s: float = 15 * 60  # an API client's session folder, idle this long, is removed (MERGESCOPE_API_IDLE)
    # Server folders whose paths a public server never shows (the session root, Gradio's cache, the demo models'
    # folder): ``redact`` turns a path under one into the visitor's own name for it.
    private_roots: list[Path] = field(default_factory=list)
    sessions_root: Path | None = None  # where the session folders live (their uploads are ``upload:NAME``)
    demo_root: Path | None = None  # the demo models' folder (each is ``demo:NAME``, components/names.py)
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
        if env.get("MERGESCOPE_SESSION_QUOTA"):
            quota = env["MERGESCOPE_SESSION_QUOTA"].strip().lower()
            settings.session_quota_bytes = None if quota in ("0", "off", "none") else parse_size(quota)
        if env.get("MERGESCOPE_API_IDLE"):
            settings.api_idle_s = float(env["MERGESCOPE_API_IDLE"])
        if env.get("MERGESCOPE_TEST_TENSOR_DELAY_S"):
            settings.tensor_delay_s = float(env["MERGESCOPE_TEST_TENSOR_DELAY_S"])
        for key, value in overrides.items():
            setattr(settings, key, value)
        return settings

    def redact(self, text: str) -> str:
        """On a server with local paths off, ``text`` with every server path replaced by what the visitor knows:
        an upload as ``upload:NAME``, a demo model as ``demo:NAME``, an output by its name in the session
        (``merge-2/README.md``); unchanged when local paths are on (components/names.py)."""
        if self.allow_local_paths or not text:
            return text
        return redact_paths(text, self.private_roots, sessions_root=self.sessions_root, demo_root=self.demo_root)

    def shown(self, path: str | Path, uploads: Path | None = None) -> str:
        """How the page shows a demo model's folder or an upload: its short name on a public server, else the path."""
        return str(path) if self.allow_local_paths else short_name(path, self.demo_root, uploads)


def quiet_request_logs() -> None:
    """httpx and httpx2 log one INFO line per request, signed CDN URLs included: WARNING and above only."""
    for name in ("httpx", "httpx2", "httpcore", "huggingface_hub.file_download"):
        logging.getLogger(name).setLevel(logging.WARNING)


def space_login() -> bool:
    """Whether Gradio's "Sign in with Hugging Face" works here: a real Space (SYSTEM=spaces) with OAuth enabled
    (``hf_oauth: true`` gives it these variables). Elsewhere Gradio would mock the login with this machine's own
    token and ask the Hub who that is, which fails offline and must never happen on a public server."""
    env = os.environ
    return (env.get("SYSTEM") == "spaces" and bool(env.get("SPACE_ID"))
            and all(env.get(k) for k in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES",
                                          "OPENID_PROVIDER_URL")))


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
    """The token for Hub calls: on a Space the signed-in visitor's (or none: never the Space owner's; the library
    itself then uses none either, ``merging.hub.ambient``), locally HF_TOKEN or the stored login (Gradio's local
    OAuth token is a mock string, useless for the Hub)."""
    if on_space():
        return getattr(oauth_token, "token", None) if oauth_token is not None else None
    return os.environ.get("HF_TOKEN") or None


def drop_space_owner_token(settings: "AppSettings") -> bool:
    """On a Space, unless MERGESCOPE_USE_SPACE_TOKEN=1, remove the owner's token from this process: every variable
    huggingface_hub reads one from (also from /proc/self/environ), the stored login and the implicit token
    (``merging.hub.drop_ambient_tokens``). A visitor must never read or push with the Space owner's account."""
    if not settings.on_space or os.environ.get(OPT_IN) == "1":
        return False
    dropped = drop_ambient_tokens()
    if dropped:
        log.warning("%s removed from this process: visitors act with their own login only (set %s=1 to share "
                    "the Space's token for reads and pushes)", ", ".join(dropped), OPT_IN)
    return bool(dropped)


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
    config = expand_names(config, settings.demo_root, [Path(r) / "uploads" for r in extra_roots])
    check_local_paths(config, settings, extra_roots)
    return config


def check_local_paths(config: MergeConfig, settings: AppSettings, extra_roots: list[Path] = ()) -> None:
    """On a Space, a path on the server's disk may only point at the demo models or the session's own uploads."""
    if settings.allow_local_paths:
        return
    roots = [r.resolve() for r in [*settings.allowed_roots, *extra_roots]]
    for ref in config.model_refs() + side_refs(config):
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
