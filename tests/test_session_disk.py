"""Disk per visitor is bounded, and a full disk at any step gives one line and leaves nothing behind.

The merges are real (a small llama-shaped family, tests/checkpoints.py) and go through the app's own
``merge_in_session``. A full disk is simulated where it would be felt: ENOSPC raised from the OS-level write calls
(``os.pwrite`` of the tensor data, ``os.posix_fallocate`` of a shard) and from the writes of side files, tokenizer
files, the model card and the zip (their ``write_bytes`` / ``write_text`` / ``ZipFile.write``); the CLI case is a
real one, not simulated: a child process whose file-size limit (``RLIMIT_FSIZE``, no root needed) is below the
output's size gets EFBIG from the kernel.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from components.common import AppSettings
from components.merge_panel import merge_in_session
from components.sessions import SessionStore
from merging.config import parse_config
from merging.errors import MergeError

ROOT = Path(__file__).resolve().parent.parent
DISK_FULL = "disk full while writing the output"


def ta_yaml(base: Path, tunes: list[Path]) -> str:
    return yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(t), "parameters": {"weight": 0.5}} for t in tunes[:2]]})


@pytest.fixture
def merge_setup(family, tmp_path):
    base, tunes = family
    (base / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {}}}')  # copied beside the output
    store = SessionStore(root=tmp_path / "sessions")
    return parse_config(ta_yaml(base, tunes)), store, AppSettings(allow_local_paths=True)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())  # hidden temp folders included


def test_one_output_per_session_and_a_quota_that_counts_the_zip(merge_setup):
    config, store, settings = merge_setup
    session = store.get("visitor")
    first = merge_in_session(config, session, settings)
    assert first.archive is not None and "tokenizer.json" in {p.name for p in first.files}
    second = merge_in_session(config, session, settings)
    assert not first.result.out_dir.exists() and not first.archive.exists()  # removed when the new merge started
    assert entries(session.folder) == ["merge-2", "merge-2.zip"]
    output = sum(p.stat().st_size for p in second.files)

    # The output fits the quota but not with its zip: refused up front, naming the quota; nothing left.
    settings.session_quota_bytes = 5 * 1000 ** 2  # the estimate adds a 4 MB side-file margin, counted twice
    with pytest.raises(MergeError, match="quota") as err:
        merge_in_session(config, session, settings)
    assert "\n" not in str(err.value) and str(session.folder) not in str(err.value)
    assert entries(session.folder) == []
    settings.session_quota_bytes = 2 * (output + 4 * 1024 ** 2) + 10 ** 6
    assert merge_in_session(config, session, settings).archive is not None

    # Uploads count too.
    (session.folder / "uploads").mkdir()
    (session.folder / "uploads" / "big.safetensors").write_bytes(b"\0" * 3 * 10 ** 6)
    with pytest.raises(MergeError, match="upload mine.safetensors: needs about 4.0 MB but this session has"):
        session.require_room(4 * 10 ** 6, 6 * 10 ** 6, "upload mine.safetensors")


def test_api_clients_expire_when_idle_and_stale_uploads_are_swept(tmp_path, monkeypatch):
    gradio_dir = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gradio_dir))
    kept_asset = gradio_dir / ("0a1b2c" * 6) / "logo.png"  # cached before the app started: the page's own file
    kept_asset.parent.mkdir(parents=True)
    kept_asset.write_bytes(b"png")
    time.sleep(0.05)
    store = SessionStore(api_idle_s=0.2, upload_ttl_s=0.2)
    assert store.root.is_relative_to(gradio_dir)
    api, page, busy = store.get("api-client"), store.get("browser"), store.get("api-busy")
    store.mark_page("browser")
    rejected = gradio_dir / ("9f8e7d" * 6) / "rejected.safetensors"  # an upload no event consumed
    rejected.parent.mkdir()
    rejected.write_bytes(b"\0" * 1000)
    other = gradio_dir / "vibe_edit_history" / "notes.json"  # a folder of Gradio's own, not an upload
    other.parent.mkdir()
    other.write_text("{}")
    with busy.working():
        store.start_sweeper(every_s=0.05)
        deadline = time.monotonic() + 30
        while (api.folder.exists() or rejected.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not api.folder.exists() and not rejected.exists() and not rejected.parent.exists()
        assert page.folder.exists() and busy.folder.exists() and kept_asset.exists() and other.exists()
    store.stop_sweeper()


def _fail(errno_: int = errno.ENOSPC) -> OSError:
    return OSError(errno_, os.strerror(errno_))


def _failing_write(original, name: str):
    def write(self, *args, **kwargs):
        if self.name == name:
            raise _fail()
        return original(self, *args, **kwargs)
    return write


STEPS = {  # where the disk fills: (what to patch, attribute, replacement factory)
    "tensor data": (os, "pwrite", lambda orig: lambda *a: (_ for _ in ()).throw(_fail())),
    "shard reservation": (os, "posix_fallocate", lambda orig: lambda *a: (_ for _ in ()).throw(_fail())),
    "config.json": (pathlib.Path, "write_text", lambda orig: _failing_write(orig, "config.json")),
    "tokenizer file": (pathlib.Path, "write_bytes", lambda orig: _failing_write(orig, "tokenizer.json")),
    "model card": (pathlib.Path, "write_text", lambda orig: _failing_write(orig, "README.md")),
    "zip": (zipfile.ZipFile, "write", lambda orig: lambda *a, **k: (_ for _ in ()).throw(_fail())),
}


def test_a_full_disk_at_any_step_is_one_line_and_leaves_nothing(merge_setup, monkeypatch):
    config, store, settings = merge_setup
    session = store.get("visitor")
    for step, (owner, attr, make) in STEPS.items():
        with monkeypatch.context() as mp:
            mp.setattr(owner, attr, make(getattr(owner, attr)))
            with pytest.raises(MergeError) as err:
                merge_in_session(config, session, settings)
        msg = str(err.value)
        assert ("not enough disk space" if step == "shard reservation" else DISK_FULL) in msg, (step, msg)
        assert "\n" not in msg and str(session.folder) not in msg, (step, msg)
        assert entries(session.folder) == [], (step, entries(session.folder))
    # The disk has room again: the next merge (this visitor's or another's) is not refused by leftovers.
    assert merge_in_session(config, store.get("next-visitor"), settings).archive is not None


def test_the_cli_reports_a_real_full_disk_in_one_line(family, tmp_path):
    base, tunes = family
    config = tmp_path / "merge.yml"
    config.write_text(ta_yaml(base, tunes))
    out = tmp_path / "out"
    limit = (base / "model.safetensors").stat().st_size // 2  # the output cannot reach its size

    def small_files() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "merging", "merge", str(config), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files,
                          env={**os.environ, "MERGESCOPE_RESOURCE_CHECK": "0"})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and ("not enough disk space" in lines[0] or DISK_FULL in lines[0]), done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_public_servers_outputs_name_inputs_as_the_visitor_does(merge_setup, tmp_path):
    """Local paths off: the model card and merge_config.yml say ``demo:base``, ``demo:ft0`` and
    ``upload:mine.safetensors``, never a server path, and paste back as a config; the exact config stays in the
    session's hidden record, from which /evaluate matches the config and the check finds its inputs."""
    from components.common import load_config
    from components.eval_panel import find_merge, merge_record
    from merging.evaluate.inputs import compare_candidates

    config, store, _ = merge_setup
    demo_root = Path(config.base_model).parent
    settings = AppSettings(allow_local_paths=False, sessions_root=store.root, demo_root=demo_root,
                           allowed_roots=[demo_root])  # as app.build_app sets them
    session = store.get("visitor")
    (session.folder / "uploads").mkdir()
    upload = session.folder / "uploads" / "mine.safetensors"
    upload.write_bytes((Path(config.models[1].model) / "model.safetensors").read_bytes())
    public = parse_config(yaml.safe_dump({**yaml.safe_load(config.to_yaml()),
                                          "models": [{"model": config.models[0].model, "parameters": {"weight": 0.5}},
                                                     {"model": str(upload), "parameters": {"weight": 0.5}}]}))
    outcome = merge_in_session(public, session, settings)
    folder = outcome.result.out_dir
    with zipfile.ZipFile(outcome.archive) as zf:
        zipped = {n.split("/", 1)[1]: zf.read(n).decode() for n in zf.namelist() if n.endswith((".md", ".yml"))}
    for name in ("README.md", "merge_config.yml"):
        text = (folder / name).read_text()
        assert zipped[name] == text
        assert str(store.root) not in text and str(demo_root) not in text and str(tmp_path) not in text, name
        assert "upload:mine.safetensors" in text and "base_model: demo:base" in text, (name, text)
    record = merge_record(folder)
    assert record.name.startswith(".") and record.read_text() == public.to_yaml()
    assert find_merge(session, public) == folder
    found = compare_candidates(folder, None, hub_cache=False, config_file=record)
    assert [c.ref for c in found] == [public.base_model, *[m.model for m in public.models]]
    assert found[0].folder and found[1].folder  # read from the record: the server paths, found
    assert found[2].folder is None and "lone weights file" in found[2].skipped  # an upload is no transformers model
    bad = session.folder / "uploads" / "bad.safetensors"
    bad.write_bytes(b"\x08\0\0\0\0\0\0\0{not json")
    with pytest.raises(MergeError) as err:  # an error names the upload by its file name
        merge_in_session(parse_config(public.to_yaml().replace(str(upload), str(bad))), session, settings)
    shown = settings.redact(str(err.value))
    assert str(bad) in str(err.value) and shown.startswith("upload:bad.safetensors"), shown
    assert str(store.root) not in shown

    # What the visitor downloaded pastes back: the short names load as the same config; unknown ones are one line.
    assert load_config(settings.redact(public.to_yaml()), settings, [session.folder]) == public
    for name, said in (("demo:nothing", "no such demo model (there are base, ft0"),
                       ("upload:other.safetensors", "no such upload in this session")):
        with pytest.raises(MergeError, match=re.escape(f"config: {name}: {said}")):
            load_config(settings.redact(public.to_yaml()).replace("demo:ft0", name), settings, [session.folder])


def test_a_public_emr_merge_names_its_tasks_as_the_visitor_does_and_still_materializes(merge_setup):
    from components.merge_panel import materialize_in_session

    config, store, _ = merge_setup
    demo_root = Path(config.base_model).parent
    settings = AppSettings(allow_local_paths=False, sessions_root=store.root, demo_root=demo_root,
                           allowed_roots=[demo_root])
    session = store.get("visitor")
    emr = parse_config(yaml.safe_dump({**yaml.safe_load(config.to_yaml()), "merge_method": "emr",
                                       "models": [{"model": m.model} for m in config.models]}))
    outcome = merge_in_session(emr, session, settings)
    assert outcome.emr_tasks == ["demo:ft0", "demo:ft1"]
    assert str(demo_root) not in (outcome.result.out_dir / "emr.json").read_text()
    files, archive = materialize_in_session(outcome.result.out_dir, "demo:ft1", session, settings)
    card = next(p for p in files if p.name == "README.md").read_text()
    assert "demo:base" in card and str(demo_root) not in card and archive.is_file()
    local = AppSettings(allow_local_paths=True)  # the same merge and task on a local server: the same weights
    there = store.get("local")
    local_files, _ = materialize_in_session(merge_in_session(emr, there, local).result.out_dir,
                                            config.models[1].model, there, local)
    weights = {p.name: p.read_bytes() for p in files if p.suffix == ".safetensors"}
    assert weights and weights == {p.name: p.read_bytes() for p in local_files if p.suffix == ".safetensors"}
