"""Each browser session (or API client) gets its own random folder for uploads and merges, removed when it ends.

The folders live under Gradio's own temp dir (``GRADIO_TEMP_DIR``, default ``<tmp>/gradio``) so that files handed to a
``gr.File`` are served from where they are, not hashed and copied (a merged 7B model is 14 GB). A session ends when
its tab closes (``demo.unload``) or when it has not been used for ``max_age_s`` (an API client never "closes"):
``sweep`` removes those, and runs whenever a session starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_AGE_S = 6 * 3600


def gradio_temp_dir() -> Path:
    """Gradio's upload/cache folder: files under it are served without a copy."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


@dataclass
class Session:
    """One user's workspace: a private folder and the flag their Cancel button sets."""

    key: str
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.time)
    counters: dict[str, int] = field(default_factory=dict)

    def new_dir(self, prefix: str) -> Path:
        """A fresh, not yet existing path inside the session folder (``merge-1``, ``merge-2`` ...)."""
        n = self.counters.get(prefix, 0) + 1
        while (self.folder / f"{prefix}-{n}").exists() or any(self.folder.glob(f"{prefix}-{n}.*")):
            n += 1
        self.counters[prefix] = n
        return self.folder / f"{prefix}-{n}"


class SessionStore:
    """Sessions by Gradio's session hash, each with its own folder under ``root``; bounded by age."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.root = Path(root) if root else gradio_temp_dir() / "mergescope"
        self.max_age_s = max_age_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_hash: str | None) -> Session:
        """The session for this hash, created (with a fresh random folder) on first use."""
        key = session_hash or "anonymous"
        with self._lock:
            session = self._sessions.get(key)
            if session is None or not session.folder.exists():
                self._sweep_locked()
                folder = self.root / secrets.token_hex(12)  # not the session hash: folder names reveal nothing
                folder.mkdir(parents=True, mode=0o700)
                session = Session(key, folder)
                self._sessions[key] = session
            session.last_used = time.time()
            _touch(session.folder)
            return session

    def close(self, session_hash: str | None) -> None:
        """End a session: stop its running job and remove its folder."""
        with self._lock:
            session = self._sessions.pop(session_hash or "anonymous", None)
        if session is not None:
            session.cancel.set()
            shutil.rmtree(session.folder, ignore_errors=True)

    def sweep(self) -> list[Path]:
        with self._lock:
            return self._sweep_locked()

    def _sweep_locked(self) -> list[Path]:
        """Remove sessions idle for longer than max_age_s, and any folder (a previous run's too) that old."""
        now = time.time()
        removed = []
        for key, session in list(self._sessions.items()):
            if now - session.last_used > self.max_age_s:
                session.cancel.set()
                del self._sessions[key]
                shutil.rmtree(session.folder, ignore_errors=True)
                removed.append(session.folder)
        owned = {s.folder for s in self._sessions.values()}
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder in owned:
                    continue
                try:
                    age = now - folder.stat().st_mtime
                except OSError:
                    continue
                # Only by age: another app process may share this root, and its live sessions touch their folders.
                if age > self.max_age_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    def __len__(self) -> int:
        return len(self._sessions)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
