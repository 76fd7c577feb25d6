"""Each browser session (or API client) gets its own random folder for uploads and merges, removed when it ends.

The folders live under Gradio's own temp dir (``GRADIO_TEMP_DIR``, default ``<tmp>/gradio``) so that files handed to a
``gr.File`` are served from where they are, not hashed and copied (a merged 7B model is 14 GB). A session ends when
its tab closes (``demo.unload``), when a page session has not been used for ``max_age_s``, or when an API client (no
page, so no heartbeat and no unload) has been idle for ``api_idle_s``: ``sweep`` removes those, whenever a session
starts and every ``SWEEP_EVERY_S`` on the sweeper thread (``start_sweeper``), which also empties Gradio's upload
cache of files older than ``upload_ttl_s`` (uploads that no event consumed, rejected ones included).

Disk per session is bounded: ``usage`` counts its folder (uploads and outputs), ``require_room`` refuses what would
pass ``quota`` bytes with one line, and ``remove_outputs`` drops the previous merge when a new one starts.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from merging.errors import MergeError

from .common import human_bytes as _size

DEFAULT_MAX_AGE_S = 6 * 3600
DEFAULT_API_IDLE_S = 15 * 60  # an API client's folder, idle this long, is removed (MERGESCOPE_API_IDLE)
DEFAULT_UPLOAD_TTL_S = 10 * 60  # Gradio's cached uploads older than this are removed
SWEEP_EVERY_S = 60
CACHE_ENTRY = re.compile(r"[0-9a-f]{16,64}")  # Gradio's cache folder for one file: its content hash
OUTPUT = re.compile(r"^\.?(merge|task|check)-\d+(\.zip|\.json|\.yml)?$")  # what actions write (new_dir)


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
    page: bool = False  # seen from a browser page (it has a heartbeat and an unload); else an API client
    busy: int = 0  # requests running in it: never swept while busy

    @contextmanager
    def working(self):
        """Hold the session while a request writes into it (the sweeper leaves it alone)."""
        self.busy += 1
        try:
            yield self
        finally:
            self.busy -= 1
            self.last_used = time.time()

    def usage(self) -> int:
        """Bytes in the session folder (uploads and outputs, hidden temp folders of a merge included)."""
        return folder_bytes(self.folder)

    def require_room(self, adding: int, quota: int | None, what: str) -> None:
        """Refuse (one line) what would take the folder past ``quota`` bytes; None: no quota."""
        if quota is None:
            return
        used = self.usage()
        if used + adding > quota:
            raise MergeError(f"{what}: needs about {_size(adding)} but this session has {_size(max(quota - used, 0))} "
                             f"of its {_size(quota)} quota left (uploads and outputs; remove uploads or start a new "
                             "session)")

    def remove_outputs(self) -> list[Path]:
        """Drop what earlier actions wrote (merges, their zips, task models, checks); uploads stay."""
        removed = []
        for entry in self.folder.iterdir() if self.folder.is_dir() else ():
            if OUTPUT.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def new_dir(self, prefix: str) -> Path:
        """A fresh, not yet existing path inside the session folder (``merge-1``, ``merge-2`` ...)."""
        n = self.counters.get(prefix, 0) + 1
        while (self.folder / f"{prefix}-{n}").exists() or any(self.folder.glob(f"{prefix}-{n}.*")):
            n += 1
        self.counters[prefix] = n
        return self.folder / f"{prefix}-{n}"


class SessionStore:
    """Sessions by Gradio's session hash, each with its own folder under ``root``; bounded by age."""

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = DEFAULT_MAX_AGE_S,
                 api_idle_s: float = DEFAULT_API_IDLE_S, upload_ttl_s: float = DEFAULT_UPLOAD_TTL_S) -> None:
        self.root = Path(root) if root else gradio_temp_dir() / "mergescope"
        self.max_age_s = max_age_s
        self.api_idle_s = api_idle_s
        self.upload_ttl_s = upload_ttl_s
        self.started = time.time()
        self._pages: set[str] = set()  # session hashes seen from a browser page
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
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
                session = Session(key, folder, page=key in self._pages)
                self._sessions[key] = session
            session.last_used = time.time()
            _touch(session.folder)
            return session

    def mark_page(self, session_hash: str | None) -> None:
        """This session has a browser page (Gradio's load event): it ends with its tab, or after max_age_s. Its
        folder is made on first use, as any session's."""
        with self._lock:
            self._pages.add(session_hash or "anonymous")
            if (session := self._sessions.get(session_hash or "anonymous")) is not None:
                session.page = True

    def close(self, session_hash: str | None) -> None:
        """End a session: stop its running job and remove its folder."""
        with self._lock:
            session = self._sessions.pop(session_hash or "anonymous", None)
            self._pages.discard(session_hash or "anonymous")
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
            idle = self.max_age_s if session.page else self.api_idle_s
            if not session.busy and now - session.last_used > idle:
                session.cancel.set()
                del self._sessions[key]
                self._pages.discard(key)
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

    def sweep_uploads(self) -> list[Path]:
        """Remove Gradio's cached uploads (``<GRADIO_TEMP_DIR>/<hash>/<name>``) older than upload_ttl_s that were
        made since this store started (what Gradio cached before, and its other folders, stay)."""
        removed = []
        now, top = time.time(), gradio_temp_dir()
        for folder in top.iterdir() if top.is_dir() else ():
            if not CACHE_ENTRY.fullmatch(folder.name) or not folder.is_dir():  # Gradio's hash folders only
                continue
            for path in folder.iterdir():
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if st.st_ctime >= self.started and now - st.st_mtime > self.upload_ttl_s and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
            try:
                folder.rmdir()  # only when empty
            except OSError:
                pass
        return removed

    def start_sweeper(self, every_s: float = SWEEP_EVERY_S) -> threading.Thread:
        """Sweep idle sessions and stale uploads every ``every_s`` seconds on a daemon thread (once per store)."""
        if self._sweeper is None:
            def loop() -> None:
                while not self._stop.wait(every_s):
                    self.sweep()
                    self.sweep_uploads()
            self._sweeper = threading.Thread(target=loop, name="session-sweeper", daemon=True)
            self._sweeper.start()
        return self._sweeper

    def stop_sweeper(self) -> None:
        self._stop.set()

    def __len__(self) -> int:
        return len(self._sessions)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (not following links), 0 when it is gone."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def discard_upload(path: str | os.PathLike) -> None:
    """Remove an upload from Gradio's cache (and its hash folder when that empties): its copy, if kept, is ours."""
    path = Path(path)
    try:
        if path.resolve().is_relative_to(gradio_temp_dir()) and path.is_file():
            path.unlink()
            path.parent.rmdir()
    except OSError:
        pass



def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
