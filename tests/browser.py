"""Browser helpers for tests: Debian's Chromium driven by Playwright, and a throwaway local HTTP server.

Playwright's own browser download is never used: ``launch_chromium`` starts the system
Chromium (``apt-get install chromium``; tests/run.sh installs it when missing) through ``executable_path``. Use the
sync API directly (``playwright.sync_api.sync_playwright``), not the pytest-playwright fixtures, which look for a
downloaded browser.

    from playwright.sync_api import sync_playwright
    from browser import launch_chromium

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        ...
        browser.close()
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = os.environ.get("MERGESCOPE_CHROMIUM", "/usr/bin/chromium")

# Headless, no sandbox (root in a container), nothing that phones home or waits on the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm; Chromium crashes when it fills
]


def chromium_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install chromium; tests/run.sh does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r tests/requirements.txt)"
    return None


def launch_chromium(playwright, **kwargs):
    """Launch headless system Chromium from a ``sync_playwright()`` (or async) handle; returns the Browser."""
    options = {"executable_path": CHROMIUM, "headless": True, "args": list(CHROMIUM_ARGS), "timeout": 60_000}
    options.update(kwargs)
    return playwright.chromium.launch(**options)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) from a daemon thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(Path(directory)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
