"""Shared fixtures. The package is installed (``pip install -e .``, tests/run.sh); this folder's helper modules
(checkpoints, fakehub, browser, ...) import by name because pytest puts a rootless test folder on the path."""

import pytest
from checkpoints import write_family
from hub_world import clear_ambient_token, hub_world


@pytest.fixture
def family(tmp_path):
    """A float32 base with three fine-tunes, two layers, llama names."""
    return write_family(tmp_path / "models", n_models=3)


@pytest.fixture
def family_bf16(tmp_path):
    return write_family(tmp_path / "models16", n_models=3, dtype="bfloat16")


@pytest.fixture(scope="module")
def chromium():  # not named `browser`/`page`: pytest-playwright's fixtures of those names want a downloaded browser
    """Debian's Chromium, headless, shared by every browser test."""
    from browser import chromium_missing_reason, launch_chromium

    reason = chromium_missing_reason()
    if reason:
        pytest.fail(reason)  # tests/run.sh installs it; a silent skip would hide a broken CI
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = launch_chromium(p)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fake-Hub world of tests/hub_world.py, one per test module that asks for it."""
    with hub_world(tmp_path_factory.mktemp("hubworld")) as built:
        yield built


@pytest.fixture
def no_ambient_token(monkeypatch, tmp_path, world):
    clear_ambient_token(monkeypatch, tmp_path, world)
