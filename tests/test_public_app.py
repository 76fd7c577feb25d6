"""A public deployment reads only what it should: Hub repos, the demo models and the session's own uploads.

The app runs as a public server does (``allow_local_paths`` off: what a Space, ``--host 0.0.0.0`` or ``--share``
sets) and real gradio_client sessions try to make ``/merge`` and ``/analyze`` read the server's files: absolute
paths, ``..``, symlinks planted in the session's upload folder, another session's folder. Every attempt must be
refused with one line naming the reference, leave no output behind, and open nothing: a Python audit hook
(``sys.addaudithook``) records every file the server process opens or lists while a request runs, so "nothing
read" is observed, not assumed.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from app_server import running_app  # noqa: E402

from merging.config import parse_config  # noqa: E402
from merging.engine import run_merge  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "assets" / "zoo"
REFUSED = "local paths are disabled on this server"


# --- observing file access in the server process ------------------------------------------------------------

class FileWatch:
    """Paths under ``targets`` that this process opens, lists or scans while watching (any thread)."""

    def __init__(self) -> None:
        self.targets: tuple[str, ...] = ()
        self.hits: list[str] = []
        self.lock = threading.Lock()
        sys.addaudithook(self._hook)  # cannot be removed; idle (one tuple check) when not watching

    def _hook(self, event: str, args: tuple) -> None:
        if not self.targets or event not in ("open", "os.listdir", "os.scandir"):
            return
        path = args[0] if args else None
        if path is None or isinstance(path, int):
            return
        try:
            path = os.path.abspath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if any(path == t or path.startswith(t.rstrip(os.sep) + os.sep) for t in self.targets):
            with self.lock:
                self.hits.append(path)

    def watch(self, *targets: str | Path) -> FileWatch:
        self.hits = []
        self.targets = tuple(os.path.abspath(str(t)) for t in targets)
        return self

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.targets = ()


WATCH = FileWatch()


# --- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app with the zoo as its demo models, launched as a public server is: no local paths."""
    with running_app(tmp_path_factory.mktemp("cache"), prefer_zoo=True, allow_local_paths=False) as running:
        assert running.demo.base.endswith("zoo/base"), running.demo
        yield running


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A valid checkpoint outside every allowed folder (so a refusal is the policy, not a broken file)."""
    folder = tmp_path_factory.mktemp("server-private") / "secret-model"
    shutil.copytree(ZOO / "digits", folder)
    return folder


def new_client(served) -> gradio_client.Client:
    return gradio_client.Client(served.url, verbose=False, download_files=False)


def session_folder(served, client) -> Path:
    """The client's session folder, as the app will use it (the store is keyed by the client's session hash)."""
    return served.sessions.get(client.session_hash).folder


def config_with(served, ref: str, as_base: bool = False) -> str:
    cfg = served.demo.config_dict()
    if as_base:
        cfg["base_model"] = ref
    else:
        cfg["models"] = cfg["models"][:1] + [{"model": ref, "parameters": {"weight": 1.0, "density": 0.2}}]
    return yaml.safe_dump(cfg)


def assert_refused(served, client, ref: str, *, watch: list, secret: str | None = None, as_base: bool = False):
    """Both endpoints refuse ``ref`` in one line naming it; no output appears; nothing under ``watch`` is opened."""
    folder = session_folder(served, client)
    before = sorted(p.name for p in folder.iterdir())
    for api in ("/merge", "/analyze"):
        with WATCH.watch(*watch), pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict(config_with(served, ref, as_base), api_name=api)
        msg = str(err.value)
        # named as the visitor knows it: a path under the server's session or demo folders without that folder
        assert REFUSED in msg and served.settings.redact(ref) in msg, (api, ref, msg)
        assert not any(os.path.abspath(r) in msg for r in served.settings.private_roots), msg
        assert "\n" not in msg and "Traceback" not in msg, msg
        if secret:
            assert secret not in msg
        assert WATCH.hits == [], f"{api} {ref}: the server opened {WATCH.hits}"
    assert sorted(p.name for p in folder.iterdir()) == before, "a refused request left something behind"


# --- the policy decision (no server) --------------------------------------------------------------------------

def test_a_launch_beyond_localhost_is_public(monkeypatch):
    from components.common import AppSettings

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("MERGESCOPE_ALLOW_LOCAL_PATHS", raising=False)
    assert AppSettings.from_env().allow_local_paths  # python app.py: 127.0.0.1
    for host in ("127.0.0.1", "localhost", "::1"):
        assert AppSettings.from_env(host=host).allow_local_paths, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "mergescope.example.org"):
        assert not AppSettings.from_env(host=host).allow_local_paths, host
    assert not AppSettings.from_env(host="127.0.0.1", share=True).allow_local_paths  # a gradio.live link
    monkeypatch.setenv("SPACE_ID", "someone/mergescope")
    assert not AppSettings.from_env(host="127.0.0.1").allow_local_paths
    monkeypatch.setenv("MERGESCOPE_ALLOW_LOCAL_PATHS", "1")  # the operator's explicit choice wins
    assert AppSettings.from_env(host="0.0.0.0").allow_local_paths


# --- a public server -----------------------------------------------------------------------------------------

def test_server_paths_are_refused_and_never_opened(served, outside):
    client = new_client(served)
    passwd = Path("/etc/passwd")
    first_line = passwd.read_text().splitlines()[0] if passwd.is_file() else None
    cases = [
        "/etc", "/etc/passwd", str(ROOT), str(ROOT / "app.py"), str(ROOT / "tests"), str(outside),
        str(outside / "model.safetensors"),
        "app.py", "merging", ".", "./tests",  # relative to the server's working directory
        "assets/zoo/../../app.py", "assets/zoo/../../merging", f"{ZOO}/../../tests",  # `..` out of the zoo
        "../" + ROOT.name, "~", "~/.bashrc",
    ]
    for ref in cases:
        watch = [outside, ROOT / "app.py", ROOT / "merging", ROOT / "tests", "/etc"]
        assert_refused(served, client, ref, watch=watch, secret=first_line)
    assert_refused(served, client, str(outside), watch=[outside], as_base=True)


def test_symlinks_planted_in_the_upload_folder_are_refused(served, outside):
    client = new_client(served)
    uploads = session_folder(served, client) / "uploads"
    uploads.mkdir(exist_ok=True)
    links = {"model-link": outside, "weights.safetensors": outside / "model.safetensors", "etc": Path("/etc")}
    for name, target in links.items():
        (uploads / name).symlink_to(target)
    for ref in (uploads / "model-link", uploads / "weights.safetensors", uploads / "etc" / "passwd",
                uploads / "model-link" / "model.safetensors"):
        assert_refused(served, client, str(ref), watch=[outside, uploads / "model-link",
                                                        uploads / "weights.safetensors", "/etc"])


def test_own_uploads_and_demo_models_work_but_another_sessions_folder_does_not(served, tmp_path):
    alice, mallory = new_client(served), new_client(served)
    alice_folder, mallory_folder = session_folder(served, alice), session_folder(served, mallory)
    assert alice_folder != mallory_folder and alice_folder.parent == mallory_folder.parent
    upload = alice_folder / "uploads" / "mine.safetensors"
    upload.parent.mkdir(exist_ok=True)
    shutil.copyfile(ZOO / "greater4" / "model.safetensors", upload)  # what the upload handler stores

    # Alice merges the demo models and her own upload ...
    files, _, summary = alice.predict(config_with(served, str(upload)), api_name="/merge")
    merged = next(Path(f["path"]) for f in files if f["path"].endswith(".safetensors"))
    assert merged.is_relative_to(alice_folder)
    expected = run_merge(parse_config(config_with(served, str(upload))), tmp_path / "direct")
    assert merged.read_bytes() == (tmp_path / "direct" / "model.safetensors").read_bytes()
    assert summary["tensors"] == expected.tensors
    stats = alice.predict(yaml.safe_dump(served.demo.config_dict()), api_name="/analyze")
    assert len(stats["meta"]["models"]) >= 2

    # ... Mallory names Alice's upload, her merge output and her whole folder: refused, never opened.
    for ref in (upload, merged, merged.parent, alice_folder, alice_folder / "uploads",
                mallory_folder / ".." / alice_folder.name / "uploads" / "mine.safetensors"):
        assert_refused(served, mallory, str(ref), watch=[alice_folder])


def test_the_file_route_serves_no_server_files(served):
    """Gradio's own /file= route: only files the app handed out; neither server files nor folder listings."""
    client = new_client(served)
    files, archive, _ = client.predict(yaml.safe_dump(served.demo.config_dict()), api_name="/merge")
    own = files[0]
    assert httpx.get(own["url"]).status_code == 200  # a download link works (it is the capability)
    base = own["url"].split("/gradio_api/file=")[0] + "/gradio_api/file="
    folder = Path(own["path"]).parent
    for path in ("/etc/passwd", ROOT / "app.py", ZOO / "base" / "model.safetensors", folder, folder.parent,
                 served.sessions.root, folder / ".." / ".." / ".." / "etc" / "passwd"):
        r = httpx.get(base + str(path))
        assert r.status_code in (403, 404), (path, r.status_code)
        assert "root:" not in r.text


def test_locally_the_same_paths_are_allowed(served, outside, tmp_path):
    """Running on localhost (allow_local_paths on), a path on the server's disk is a model like any other."""
    client = new_client(served)
    uploads = session_folder(served, client) / "uploads"
    uploads.mkdir(exist_ok=True)
    (uploads / "model-link").symlink_to(outside)
    served.settings.allow_local_paths = True
    try:
        for ref in (str(outside), str(uploads / "model-link")):
            with WATCH.watch(outside, uploads / "model-link"):
                files, _, _ = client.predict(config_with(served, ref), api_name="/merge")
            assert any(h.endswith("model.safetensors") for h in WATCH.hits), (ref, WATCH.hits)  # the watch sees reads
            merged = next(Path(f["path"]) for f in files if f["path"].endswith(".safetensors"))
            run_merge(parse_config(config_with(served, ref)), tmp_path / ref.replace("/", "_"))
            assert merged.read_bytes() == (tmp_path / ref.replace("/", "_") / "model.safetensors").read_bytes()
    finally:
        served.settings.allow_local_paths = False
