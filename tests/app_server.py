"""Run the real app (app.build_app) on a free 127.0.0.1 port in this process, for the API and browser tests."""

from __future__ import annotations

import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from merging.demo import DemoModels, ensure_demo_models


@dataclass
class RunningApp:
    url: str
    settings: object  # components.common.AppSettings: tests may change tensor_delay_s between merges
    sessions: object  # components.sessions.SessionStore
    demo: DemoModels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(cache_dir: Path, *, prefer_zoo: bool = True, **settings):
    """The app as ``python app.py`` builds it, with its demo models under ``cache_dir`` and its own session root."""
    import app as app_module
    from components.common import AppSettings
    from components.sessions import SessionStore, gradio_temp_dir

    demo = ensure_demo_models(cache_dir, prefer_zoo=prefer_zoo)
    app_settings = AppSettings.from_env(**settings)
    sessions = SessionStore(root=gradio_temp_dir() / f"mergescope-test-{uuid.uuid4().hex[:8]}")
    blocks = app_module.build_app(app_settings, sessions, demo)
    blocks.queue(default_concurrency_limit=4)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                  max_file_size=app_settings.max_upload_bytes, css=app_module.CSS)
    try:
        yield RunningApp(f"http://127.0.0.1:{port}/", app_settings, sessions, demo)
    finally:
        blocks.close()
        import shutil

        shutil.rmtree(sessions.root, ignore_errors=True)
