"""On a Space the owner's token serves nobody: a visitor who is not signed in acts anonymously, whatever the server has.

The owner's token is planted under every name huggingface_hub 2.x reads one from (``HF_TOKEN``,
``HUGGING_FACE_HUB_TOKEN``) and as a stored ``hf auth login`` (``HF_TOKEN_PATH`` and ``stored_tokens`` beside it);
the app starts as ``python app.py`` does on a Space (``SPACE_ID`` set, ``SYSTEM`` not: no working login button,
offline), and an anonymous gradio_client visitor tries the Hub's private repo of the owner through search,
resolve, pre-flight, merge, analyze and push against the fake Hub on 127.0.0.1 (tests/fakehub.py), which records
whether each request carried a token. Every one must fail in one line, and no request may carry a token. A control
shows the planted token really opens the repo (so the refusals are the rule, not a broken setup), and a child
process started with the token in its environment shows that /proc/<pid>/environ no longer holds it after
start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from app_server import running_app  # noqa: E402
from hub_world import SECRET, resolver  # noqa: E402

from merging import hub  # noqa: E402
from merging.errors import MergeError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = "owner/private-ft"


@pytest.fixture(scope="module")
def space(world, tmp_path_factory):
    """The app in Space mode with the owner's token planted everywhere, dropped at start-up as app.main does."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    from components.common import AppSettings, drop_space_owner_token

    world["hub"].add_repo(PRIVATE, world["ft1"], private_token=SECRET, base_models=["acme/base"])
    home = tmp_path_factory.mktemp("hf-home")
    (home / "token").write_text(SECRET)
    (home / "stored_tokens").write_text(f"[owner]\nhf_token = {SECRET}\n")
    mp = pytest.MonkeyPatch()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        mp.setenv(name, SECRET)
    for name in ("SYSTEM", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HF_ENDPOINT", OPT_IN_NAME):
        mp.delenv(name, raising=False)
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_TOKEN_PATH", str(home / "token"))
    mp.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "0")  # restored afterwards, like everything drop changes
    mp.setenv("SPACE_ID", "owner/mergescope")
    mp.setenv("MERGESCOPE_HF_ENDPOINT", world["hub"].url)
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    mp.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    try:
        assert huggingface_hub.get_token() == SECRET  # the plant works: huggingface_hub would use it
        mp.delenv("HF_TOKEN")
        mp.delenv("HUGGING_FACE_HUB_TOKEN")
        assert huggingface_hub.get_token() == SECRET  # ... from the stored login alone too
        mp.setenv("HF_TOKEN", SECRET)
        mp.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
        settings = AppSettings.from_env()
        assert settings.on_space and not settings.login and not settings.allow_local_paths
        assert drop_space_owner_token(settings)
        assert huggingface_hub.get_token() is None
        assert SECRET not in "".join(os.environ.values())
        with running_app(tmp_path_factory.mktemp("cache"), prefer_zoo=True) as running:  # builds offline
            assert running.settings.on_space and not running.settings.allow_local_paths
            yield running
    finally:
        mp.undo()


OPT_IN_NAME = "MERGESCOPE_USE_SPACE_TOKEN"


def private_config(served) -> str:
    return yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "acme/base",
                           "models": [{"model": "acme/ft0", "parameters": {"weight": 0.5}},
                                      {"model": PRIVATE, "parameters": {"weight": 0.5}}]})


def test_an_anonymous_visitor_reads_nothing_private(space, world):
    from components.common import hf_token

    fake = world["hub"]
    fake.reset_counts()
    client = gradio_client.Client(space.url, verbose=False, download_files=False)
    config = private_config(space)
    for api in ("/merge", "/analyze"):  # resolve + read, through the app's endpoints
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict(config, api_name=api)
        msg = str(err.value)
        assert PRIVATE in msg and "\n" not in msg and SECRET not in msg, (api, msg)
    token = hf_token(None)  # what the page's handlers pass for a visitor who is not signed in
    assert token is None
    found = hub.search_models("ft", limit=30, token=token, endpoint=fake.url)
    assert found and PRIVATE not in {m.repo_id for m in found}
    assert PRIVATE not in {m.repo_id for m in hub.fine_tunes_of("acme/base", limit=30, token=token,
                                                               endpoint=fake.url)}
    with pytest.raises(MergeError, match=PRIVATE):
        hub.preflight(config, token, resolver=resolver(world))
    files, _, _ = client.predict(yaml.safe_dump(space.demo.config_dict()), api_name="/merge")
    merged = Path(next(f["path"] for f in files if f["path"].endswith(".safetensors"))).parent
    with pytest.raises(MergeError, match="needs a token"):
        hub.push_merge(merged, "owner/pushed", token=token, endpoint=fake.url)
    assert fake.requests, "the visitor's requests never reached the fake Hub"
    assert not [r for r in fake.requests if r["authorized"]], "a request carried a token"
    assert not fake.cdn_saw_authorization

    # Control: the visitor who signs in with that account gets in (the token is what the refusals lacked).
    signed_in = hf_token(SimpleNamespace(token=SECRET))
    assert hub.preflight(config, signed_in, resolver=resolver(world, token=signed_in)).compatible


def test_the_owners_opt_in_shares_the_token(monkeypatch):
    from merging.hub import resolve_token

    monkeypatch.setenv("SPACE_ID", "owner/mergescope")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv(OPT_IN_NAME, raising=False)
    assert resolve_token(None) is None and resolve_token("hf_visitor") == "hf_visitor"
    monkeypatch.setenv(OPT_IN_NAME, "1")
    assert resolve_token(None) == SECRET
    monkeypatch.delenv("SPACE_ID")
    assert resolve_token(None) == SECRET  # locally the environment is the user's own


def test_proc_environ_no_longer_holds_the_token(tmp_path):
    """A real process started with the token (as a Space starts the app): after the drop, neither os.environ nor
    its start-up environment block, which /proc/<pid>/environ reads, holds it."""
    if not Path("/proc/self/environ").exists():
        pytest.fail("no /proc: this check needs Linux")
    # merging/hub/ambient.py on its own (drop_space_owner_token's work), without loading torch through the package
    code = ("import importlib.util, os; spec = importlib.util.spec_from_file_location('ambient', "
            "'merging/hub/ambient.py'); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "before = open('/proc/self/environ', 'rb').read(); dropped = m.drop_ambient_tokens(); "
            "after = open('/proc/self/environ', 'rb').read(); "
            f"t = {SECRET!r}.encode(); print(t in before, t in after, {SECRET!r} in str(dict(os.environ)), "
            "','.join(dropped).replace(' ', '_'))")
    env = {**os.environ, "SPACE_ID": "owner/mergescope", "HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET,
           "HF_HOME": str(tmp_path)}
    env.pop(OPT_IN_NAME, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False", "HF_TOKEN,HUGGING_FACE_HUB_TOKEN"], out.stdout


def test_a_tokenizer_source_path_obeys_the_model_path_rules(space):
    client = gradio_client.Client(space.url, verbose=False, download_files=False)
    cfg = space.demo.config_dict()
    outside = str(ROOT / "assets" / "zoo" / ".." / ".." / "merging")
    for extra in ({"tokenizer_source": "/etc"}, {"tokenizer_source": outside},
                  {"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "/etc"}}}},
                  {"tokenizer": {"source": "base", "tokens": {"<x>": {"source": {"kind": "model_token",
                                                                                 "model": "/etc", "token_id": 0}}}}}):
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict(yaml.safe_dump({**cfg, **extra}), api_name="/merge")
        msg = str(err.value)
        assert "local paths are disabled on this server" in msg and "\n" not in msg, (extra, msg)
        assert str(ROOT) not in msg, msg


@pytest.mark.parametrize("system, oauth", [("", False), ("spaces", False)])
def test_start_up_works_offline_whatever_space_variables_are_set(monkeypatch, tmp_path, system, oauth):
    """SPACE_ID with or without SYSTEM=spaces, no OAuth variables, no network: the page builds, without the
    Sign-in button (which would ask the Hub who this machine's token belongs to)."""
    import app as app_module
    from components.common import AppSettings
    from components.sessions import SessionStore
    from merging.demo import ensure_demo_models

    monkeypatch.setenv("SPACE_ID", "owner/mergescope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SYSTEM", system) if system else monkeypatch.delenv("SYSTEM", raising=False)
    for name in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = AppSettings.from_env()
    assert settings.on_space and settings.login is oauth and not settings.allow_local_paths
    sessions = SessionStore(root=tmp_path / "sessions")
    blocks = app_module.build_app(settings, sessions, ensure_demo_models(tmp_path / "cache", prefer_zoo=True))
    sessions.stop_sweeper()
    assert not any(type(b).__name__ == "LoginButton" for b in blocks.blocks.values())
    assert any(getattr(b, "elem_id", None) == "merge-button" for b in blocks.blocks.values())


def test_the_page_names_demo_models_by_short_name(space):
    """The page as a browser gets it (Gradio's /config: every component's value): the demo models are
    ``demo:NAME`` in the model boxes and the YAML, and no server folder appears; those names merge."""
    import httpx

    page = httpx.get(space.url + "config", timeout=30).text
    demo_root = str(Path(space.demo.base).parent)
    assert "demo:base" in page and "base_model: demo:base" in page
    assert demo_root not in page and str(space.sessions.root) not in page
    config = yaml.safe_dump({**space.demo.config_dict(), "base_model": "demo:base",
                             "models": [{"model": f"demo:{Path(p).name}", "parameters": {"weight": 0.5}}
                                        for p in list(space.demo.models.values())[:2]]})
    client = gradio_client.Client(space.url, verbose=False, download_files=False)
    _, _, summary = client.predict(config, api_name="/merge")
    assert summary["tensors"] > 0
