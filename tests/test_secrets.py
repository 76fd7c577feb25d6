"""Tokens never leak: not into logs, error messages, model cards, merge_config.yml or any downloadable file.

Tokens are planted where the app and the CLI take them: ``HF_TOKEN`` in the server's environment, the visitor's
login (``gr.OAuthToken``, which gradio_client sends as ``oauth_token``), and ``HF_TOKEN`` for the CLI. Merges and
analyses run against a Hub on 127.0.0.1 (tests/fakehub.py) whose gated repos accept only the planted token, so a
successful gated merge proves the token was really used; failing ones (a private repo, a missing repo or revision,
a Hub answering 503 until the retries run out, a wrong token) produce the error paths. Then everything is
searched for the tokens, and for the marker ``PLANTED`` that each contains (which also catches a cut token):
the server's stdout and stderr, every error message, every file under the app's temp folder and every file the
client downloaded, zip members unpacked (a deflated token would not show in the raw zip), the CLI's output, the
merged folders and the huggingface_hub cache.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
import time
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from app_server import free_port, running_app  # noqa: E402
from fakehub import FakeHub  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "assets" / "zoo"
MARKER = b"PLANTED"
ENV_TOKEN = "hf_PLANTEDenvSecret123"  # HF_TOKEN of the server / the CLI user
LOGIN_TOKEN = "hf_PLANTEDloginSecret456"  # the visitor's login on a Space
OTHER_TOKEN = "hf_PLANTEDotherSecret789"  # someone else's: opens the private repo, never given to us


def leaks(data: bytes | str, where: str) -> list[str]:
    data = data.encode() if isinstance(data, str) else data
    return [where] if MARKER in data else []


def leaks_in_tree(root: Path) -> list[str]:
    """Every file under ``root`` (zip members unpacked) that contains the marker."""
    found = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += leaks(data, str(path))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    found += leaks(zf.read(name), f"{path}!{name}")
    return found


def test_the_search_finds_a_planted_token(tmp_path):
    """The detector itself: a token in a plain file, in a deflated zip member, in a nested folder."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "card.md").write_text(f"token: {ENV_TOKEN}")
    with zipfile.ZipFile(tmp_path / "out.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("merge-1/README.md", f"x{LOGIN_TOKEN}x" * 50)
    assert MARKER not in (tmp_path / "out.zip").read_bytes()  # invisible to a plain grep of the zip
    assert leaks_in_tree(tmp_path) == [str(tmp_path / "a" / "b" / "card.md"), f"{tmp_path / 'out.zip'}!merge-1/README.md"]


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as fake:
        fake.add_repo("org/base", ZOO / "base")
        fake.add_repo("org/gated", ZOO / "digits", gated_token=ENV_TOKEN)
        fake.add_repo("org/gated-login", ZOO / "parity", gated_token=LOGIN_TOKEN)
        fake.add_repo("org/private", ZOO / "noisy", private_token=OTHER_TOKEN)
        fake.add_repo("org/gated-other", ZOO / "rotated", gated_token=OTHER_TOKEN)
        fake.add_repo("org/flaky", ZOO / "shifted")
        yield fake


def hub_config(*repos: str, method: str = "task_arithmetic") -> str:
    return yaml.safe_dump({"merge_method": method, "base_model": "org/base", "parameters": {"lambda": 0.5},
                           "models": [{"model": r, "parameters": {"weight": 1.0}} for r in repos]})


FAILING = {  # config -> what its one-line message must name
    hub_config("org/private"): "org/private",
    hub_config("org/gated-other"): "org/gated-other",
    hub_config("org/missing"): "org/missing",
    hub_config("org/gated@no-such-branch"): "org/gated",
    hub_config("org/flaky"): "org/flaky",
}


def break_flaky(hub: FakeHub) -> None:
    hub.fail_next("org/flaky", "model.safetensors", status=503, times=10_000)


def fast_retries(monkeypatch, **defaults) -> None:
    """The Hub client's backoff (0.5 s doubling, 5 retries) shortened so a Hub that stays down fails in a blink."""
    import merging.hub

    monkeypatch.setattr(merging.hub, "hub_resolver",
                        functools.partial(merging.hub.hub_resolver, backoff_s=0.001, **defaults))


# --- the app as deployed: its own process, HF_TOKEN in its environment ----------------------------------------

@pytest.mark.slow
def test_app_process_never_writes_the_token(hub, tmp_path):
    port = free_port()
    logs = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MERGESCOPE_", "HF_", "GRADIO_", "SPACE"))}
    env.update(HF_TOKEN=ENV_TOKEN, MERGESCOPE_HF_ENDPOINT=hub.url, GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
               HF_HOME=str(tmp_path / "hf-home"), MERGESCOPE_CACHE=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(logs, "wb") as log:
        server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, logs.read_text()[-3000:]
            time.sleep(0.3)
        downloads = tmp_path / "client-downloads"
        client = gradio_client.Client(url, verbose=False, oauth_token=LOGIN_TOKEN, download_files=str(downloads))

        demo = {"merge_method": "ties", "base_model": str(ZOO / "base"), "parameters": {"lambda": 1.0},
                "models": [{"model": str(ZOO / m), "parameters": {"density": 0.2, "weight": 1.0}}
                           for m in ("digits", "parity")]}
        client.predict(yaml.safe_dump(demo), api_name="/analyze")
        hub.reset_counts()
        files, archive, summary = client.predict(hub_config("org/gated"), api_name="/merge")
        assert summary["tensors"] == 55 and archive  # the gated repo opened: the planted token was sent
        assert any(r["authorized"] and "org/gated" in r["path"] for r in hub.requests)
        assert not hub.cdn_saw_authorization  # and only to the Hub, never to the CDN it redirects to
        client.predict(hub_config("org/gated"), api_name="/analyze")

        # In a session of their own: a new merge removes its session's previous output, searched below.
        failing = gradio_client.Client(url, verbose=False, oauth_token=LOGIN_TOKEN, download_files=str(downloads))
        for config, names in FAILING.items():
            if "org/flaky" in config:
                continue  # the app's own backoff takes 15 s to give up; the in-process tests shorten it
            with pytest.raises(gradio_client.exceptions.AppError) as err:
                failing.predict(config, api_name="/merge")
            messages.append(str(err.value))
            assert names in messages[-1] and "\n" not in messages[-1], messages[-1]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "Running on" in logs.read_text()  # the log was captured (Gradio's start-up line is in it)
    found = leaks(logs.read_bytes(), "server stdout/stderr")
    found += [f"message: {m}" for m in messages if MARKER.decode() in m]
    found += leaks_in_tree(tmp_path / "gradio") + leaks_in_tree(downloads)
    assert not found, found
    # The search looked at real outputs: the model card, merge_config.yml and the zip were among them.
    names = {p.name for p in (tmp_path / "gradio").rglob("*") if p.is_file()}
    assert {"README.md", "merge_config.yml", "model.safetensors", "merge-1.zip"} <= names, names
    assert sum("the token sent was refused" in m for m in messages) == 2  # private and wrongly gated: said, not shown


# --- a Space: the visitor's login token -----------------------------------------------------------------------

def test_visitor_login_token_is_used_and_never_written(hub, tmp_path, monkeypatch, capfd, caplog):
    import logging

    caplog.set_level(logging.DEBUG)  # every library's debug logging too
    monkeypatch.setenv("MERGESCOPE_HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    fast_retries(monkeypatch)  # streamed (cache=False): nothing goes to the huggingface_hub cache
    break_flaky(hub)
    messages = []
    with running_app(tmp_path / "cache", allow_local_paths=False) as served:
        monkeypatch.setenv("SPACE_ID", "someone/mergescope")  # hf_token(): the visitor's login, never HF_TOKEN
        visitor = gradio_client.Client(served.url, verbose=False, oauth_token=LOGIN_TOKEN,
                                       download_files=str(tmp_path / "downloads"))
        files, archive, _ = visitor.predict(hub_config("org/gated-login"), api_name="/merge")
        assert archive and any(Path(f).name == "README.md" for f in files)
        visitor.predict(hub_config("org/gated-login"), api_name="/analyze")
        anonymous = gradio_client.Client(served.url, verbose=False, download_files=False)
        with pytest.raises(gradio_client.exceptions.AppError) as err:  # no login: the gated repo stays shut
            anonymous.predict(hub_config("org/gated-login"), api_name="/merge")
        messages.append(str(err.value))
        for config, names in FAILING.items():
            for api in ("/merge", "/analyze"):
                with pytest.raises(gradio_client.exceptions.AppError) as err:
                    visitor.predict(config, api_name=api)
                messages.append(str(err.value))
                assert names in messages[-1] and "\n" not in messages[-1], messages[-1]
        assert any("download failed after 5 retries (HTTP 503)" in m for m in messages)
        found = leaks_in_tree(served.sessions.root)
    out, err_text = capfd.readouterr()
    found += leaks(out + err_text, "captured stdout/stderr")
    found += leaks("\n".join(r.getMessage() + repr(r.args) for r in caplog.records), "log records")
    found += [f"message: {m}" for m in messages if MARKER.decode() in m]
    found += leaks_in_tree(tmp_path / "downloads")
    assert not found, found
    assert "org/gated-login" in messages[0]


# --- the CLI: HF_TOKEN set -----------------------------------------------------------------------------------

def run_cli(*args: str) -> tuple[int, str]:
    from merging.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue() + err.getvalue()


def test_cli_never_prints_or_writes_the_token(hub, tmp_path, monkeypatch, capfd, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("MERGESCOPE_HF_ENDPOINT", hub.url)
    # huggingface_hub read HF_HOME at import: the cache folder is given to the resolver (and its default) instead.
    import huggingface_hub.constants

    hub_cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    fast_retries(monkeypatch, cache_dir=str(hub_cache))
    break_flaky(hub)
    found, outputs = [], []
    for k, (config, names) in enumerate(FAILING.items()):
        (tmp_path / f"fail-{k}.yml").write_text(config)
        code, text = run_cli("merge", str(tmp_path / f"fail-{k}.yml"), str(tmp_path / f"fail-{k}"))
        assert code == 2 and names in text and not (tmp_path / f"fail-{k}").exists(), text
        outputs.append(text)
    (tmp_path / "gated.yml").write_text(hub_config("org/gated"))
    for flags in ([], ["--hub-cache"]):  # streamed by range requests, and downloaded into the hub cache
        out_dir = tmp_path / f"merged{'-cached' if flags else ''}"
        code, text = run_cli("merge", str(tmp_path / "gated.yml"), str(out_dir), *flags)
        assert code == 0 and (out_dir / "README.md").is_file() and (out_dir / "merge_config.yml").is_file(), text
        outputs.append(text)
    assert any((tmp_path / "hf-home").rglob("*.safetensors"))  # the cached run really used the hub cache
    out, err = capfd.readouterr()
    found += leaks("\n".join(outputs) + out + err, "CLI output")
    found += leaks("\n".join(r.getMessage() + repr(r.args) for r in caplog.records), "log records")
    found += leaks_in_tree(tmp_path)  # the merged folders, the hub cache, the configs
    assert not found, found

    # The same through a real process: a failing gated merge with the token set prints one line, no token.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "merging", "merge", str(tmp_path / "fail-1.yml"),
                           str(tmp_path / "proc-out")], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 2 and MARKER not in proc.stdout + proc.stderr
    assert proc.stderr.decode().strip().count("\n") == 0 and b"org/gated-other" in proc.stderr
