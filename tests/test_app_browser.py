"""The new user's path in a real browser: Debian's headless Chromium, driven by Playwright, against the app on
loopback. Open the page (the demo models are there), Analyze (Plotly charts render), Merge (the progress bar moves),
download the weights (a valid safetensors file); Cancel a merge (nothing is left); a bad config is explained; Check
the merged model (a perplexity chart and the verdict).

Merges of the demo models take well under a second, so these tests slow the merge down with the app's test-only
``tensor_delay_s`` (a sleep after each merged tensor) to watch the progress bar and to cancel in the middle.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
from app_server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("cache")) as running:  # what `python app.py` opens on
        yield running




@pytest.fixture
def app_page(chromium, served):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(served.url)
    page.wait_for_selector("#analyze-button")
    yield page
    context.close()


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def progress_values(page) -> list[tuple[int, int]]:
    """(tensors done, total) from every visible progress bar's label, e.g. 'merging: 12/57 tensors · ...'."""
    found = []
    for label in page.locator('[role="progressbar"]').evaluate_all("bars => bars.map(b => b.ariaLabel || '')"):
        m = re.search(r"(\d+)/(\d+) tensors", label)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
    return found


def parse_safetensors(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    assert 8 + n + max(e["data_offsets"][1] for e in header.values()) == len(data)
    return header


def session_folders(served) -> set[Path]:
    return set(served.sessions.root.iterdir()) if served.sessions.root.is_dir() else set()


def test_new_user_analyzes_merges_downloads_and_pushes(app_page, served, tmp_path, monkeypatch):
    page = app_page
    demo = served.demo
    assert textbox(page, "base-model").input_value() == demo.base
    for i, ref in enumerate(demo.models.values()):
        assert textbox(page, f"model-{i}").input_value() == ref
    assert demo.method in page.locator("#config-yaml").inner_text()

    page.click("#preflight-button")
    page.wait_for_function("document.querySelector('#preflight').innerText.includes('reads')")
    preflight = page.locator("#preflight").inner_text()
    assert "incompatible" not in preflight and "compatible" in preflight

    page.click("#analyze-button")
    page.wait_for_selector(".js-plotly-plot")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 5")
    assert page.locator(".js-plotly-plot").count() >= 5
    page.wait_for_function("document.querySelector('#analyze-status').innerText.includes('Done')")  # charts drawn
    assert f"analysis of {len(demo.models)} models" in page.locator("#analyze-status").inner_text()
    titles = page.locator(".js-plotly-plot .gtitle").evaluate_all("ts => ts.map(t => t.textContent)")
    assert any("sign" in t for t in titles), titles
    time.sleep(0.5)  # let Plotly finish its transitions before the picture
    shot = tmp_path / "after_analyze.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("MERGESCOPE_SCREENSHOT"):  # the README's picture: the first screen after Analyze
        page.screenshot(path=os.environ["MERGESCOPE_SCREENSHOT"], clip={"x": 0, "y": 0, "width": 1400, "height": 1150})

    served.settings.tensor_delay_s = 0.1  # 55 tensors: ~5 s, so a loaded machine's slow polls still see it move
    try:
        page.click("#merge-button")
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not page.locator("#download-weights").is_visible():
            seen += progress_values(page)
            time.sleep(0.1)
    finally:
        served.settings.tensor_delay_s = 0.0
    done = sorted({d for d, _ in seen})
    assert len(done) >= 3 and done[0] < done[-1], f"the progress bar never moved: {seen}"

    with page.expect_download() as info:
        page.click("#download-weights")
    path = info.value.path()
    header = parse_safetensors(Path(path).read_bytes())
    from merging.safetensors_io import read_local_header

    base_header, _ = read_local_header(next(Path(demo.base).glob("*.safetensors")))
    assert sorted(header) == sorted(base_header)
    assert all(header[n]["shape"] == list(base_header[n].shape) for n in header)
    assert "model.safetensors" in page.locator("#merge-status").inner_text()
    assert page.locator("#merge-archive").is_visible()  # several files: one zip as well

    # Push: the Hub's upload protocol cannot exist offline, so merging.hub.push_merge is replaced at that one
    # boundary; what is checked is what the app hands it (the finished folder, the repo, HF_TOKEN locally).
    import merging.hub

    pushed = []
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(merging.hub, "push_merge", lambda folder, repo, token=None, private=False: (
        pushed.append((Path(folder), repo, token, private)) or f"https://huggingface.co/{repo}"))
    page.get_by_text("Push to the Hugging Face Hub").click()
    textbox(page, "push-repo").fill("someone/merged")
    page.click("#push-button")
    page.wait_for_function("document.querySelector('#push-status').innerText.includes('Pushed')")
    (folder, repo, token, private), = pushed
    assert repo == "someone/merged" and token == "hf_test_token" and private is True
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()


def test_cancel_stops_the_merge_and_leaves_nothing(app_page, served):
    page = app_page
    before = session_folders(served)
    served.settings.tensor_delay_s = 0.3  # the demo merge would take tensors × 0.3 s
    try:
        page.click("#merge-button")
        page.wait_for_function("[...document.querySelectorAll('[role=progressbar]')]"
                               ".some(b => /[1-9]\\d*\\/\\d+ tensors/.test(b.ariaLabel))")
        started = progress_values(page)[0]
        page.click("#cancel-button")
        clicked = time.monotonic()
        page.wait_for_function("document.querySelector('#merge-status').innerText.includes('Cancelled')")
        stopped_after = time.monotonic() - clicked
    finally:
        served.settings.tensor_delay_s = 0.0
    total = started[1]
    assert stopped_after < 0.3 * total / 2, f"the merge ran on for {stopped_after:.1f} s after Cancel"
    new = session_folders(served) - before
    assert len(new) == 1, new
    left = [p for p in next(iter(new)).rglob("*")]
    assert left == [], f"a cancelled merge left {left}"
    assert not page.locator("#download-weights").is_visible()


def test_form_and_yaml_follow_each_other_and_a_bad_config_is_explained(app_page, served):
    page = app_page
    # Form → YAML: a parameter typed in the form appears in the config.
    lam = page.locator("#param-ties-lambda input").first
    lam.fill("0.55")
    lam.press("Tab")
    page.wait_for_function("document.querySelector('#config-yaml').innerText.includes('lambda: 0.55')")

    editor = page.locator("#config-yaml .cm-content")
    # A valid edit first: the form follows the YAML (method, base).
    base = served.demo.base
    first = next(iter(served.demo.models.values()))
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(f"{{merge_method: linear, base_model: {base}, models: [{{model: {first}}}]}}")
    page.wait_for_function("document.querySelector('#method input').value === 'linear'")
    assert "Valid config" in page.locator("#yaml-status").inner_text()

    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(f"{{merge_method: nope, base_model: {base}, models: [{{model: {first}}}]}}")
    page.wait_for_function("document.querySelector('#yaml-status').innerText.includes('nope')")
    status = page.locator("#yaml-status").inner_text()
    assert "unknown merge_method 'nope'" in status and "Traceback" not in status

    # The error stays in the Diagnostics' status line (issue 14: no popup that fades).
    page.click("#analyze-button")
    page.wait_for_function("document.querySelector('#analyze-status').innerText.includes('unknown merge_method')")
    assert "Traceback" not in page.locator("#analyze-status").inner_text()


def test_uploaded_safetensors_becomes_a_model_of_the_config(app_page, served, tmp_path):
    page = app_page
    source = next(Path(next(iter(served.demo.models.values()))).glob("*.safetensors"))
    upload = tmp_path / "my-finetune.safetensors"
    upload.write_bytes(source.read_bytes())
    page.get_by_text("Find models on the Hub, or upload small ones").click()  # a closed accordion renders nothing
    page.locator("#upload input[type=file]").set_input_files(str(upload))
    n = len(served.demo.models)
    page.wait_for_function(f"document.querySelector('#model-{n} input').value.endsWith('my-finetune.safetensors')")
    stored = Path(textbox(page, f"model-{n}").input_value())
    assert stored.read_bytes() == source.read_bytes() and served.sessions.root in stored.parents
    page.wait_for_function("document.querySelector('#config-yaml').innerText.includes('my-finetune.safetensors')")


def test_emr_merge_offers_each_task_as_a_download(app_page, served):
    page = app_page
    demo = served.demo
    models = ", ".join(f"{{model: {ref}}}" for ref in demo.models.values())
    editor = page.locator("#config-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(f"{{merge_method: emr, base_model: {demo.base}, models: [{models}]}}")
    page.wait_for_function("document.querySelector('#method input').value === 'emr'")
    page.click("#merge-button")
    page.wait_for_selector("#emr-button")
    assert page.locator("#emr-task input").input_value() == next(iter(demo.models.values()))
    assert "not a model on its own" in page.locator("#emr-note").inner_text()  # issue 14: EMR says what it is
    with page.expect_download() as info:  # Materialize downloads the task's model at once (one zip)
        page.click("#emr-button")
    import zipfile

    with zipfile.ZipFile(info.value.path()) as zf:
        assert any(n.endswith("/model.safetensors") for n in zf.namelist())
    page.wait_for_function("document.querySelector('#emr-files').innerText.includes('.safetensors')")
    links = page.locator("#emr-files a").evaluate_all("as => as.map(a => a.href)")
    weights = [h for h in links if h.endswith(".safetensors")]
    assert len(weights) == 1
    data = page.request.get(weights[0]).body()
    from merging.safetensors_io import read_local_header

    base_header, _ = read_local_header(next(Path(demo.base).glob("*.safetensors")))
    assert sorted(parse_safetensors(data)) == sorted(base_header)  # an ordinary checkpoint of the base's shape


def test_hub_search_adds_a_model_to_the_config(app_page, served, monkeypatch):
    """Search a Hub-compatible server on 127.0.0.1 (tests/fakehub.py), pick a result, add it as a model."""
    from fakehub import FakeHub

    page = app_page
    with FakeHub() as hub:
        hub.add_repo("acme/base", served.demo.base, downloads=900)
        hub.add_repo("acme/ft-popular", next(iter(served.demo.models.values())), downloads=500,
                     base_models=["acme/base"])
        monkeypatch.setenv("MERGESCOPE_HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        page.get_by_text("Find models on the Hub, or upload small ones").click()
        textbox(page, "search-box").fill("acme")
        page.click("#search-button")
        page.wait_for_function("document.querySelector('#picker-status').innerText.includes('models found')")
        assert "2 models found" in page.locator("#picker-status").inner_text()
        dropdown = textbox(page, "search-results")
        dropdown.click()
        page.get_by_role("option", name="acme/ft-popular").click()  # a substring of the label
        page.click("#add-model-button")
        n = len(served.demo.models)
        page.wait_for_function(f"document.querySelector('#model-{n} input').value === 'acme/ft-popular'")
        page.wait_for_function("document.querySelector('#config-yaml').innerText.includes('acme/ft-popular')")


def test_check_the_merged_model_shows_the_perplexity_chart_and_the_verdict(app_page, tmp_path_factory):
    """A small Llama family trained in the test (tests/lm_family.py): merge it with TIES, press Check, and see one
    bar per model (base, two fine-tunes, merged), the caption, the continuations side by side and the verdict."""
    from lm_family import family

    fam = family(tmp_path_factory, "llama")
    page = app_page
    models = ", ".join(f"{{model: {t}, parameters: {{weight: 1.0, density: 0.5}}}}" for t in fam.tunes)
    editor = page.locator("#config-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(f"{{merge_method: ties, base_model: {fam.base}, models: [{models}], "
                              "parameters: {lambda: 1.0}}")
    page.wait_for_function("document.querySelector('#yaml-status').innerText.includes('Valid config')")
    page.click("#merge-button")
    page.wait_for_function("document.querySelector('#merge-status').innerText.includes('Merged')")
    page.click("#eval-button")
    page.wait_for_selector("#eval-chart .js-plotly-plot .barlayer .point", timeout=90_000)
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes('verdict:')")
    status = page.locator("#eval-status").inner_text()
    assert "verdict: OK: perplexity" in status and "Traceback" not in status
    assert page.locator("#eval-chart .barlayer .point").count() == 4
    ticks = page.locator("#eval-chart .xtick text").evaluate_all("ts => ts.map(t => t.textContent)")
    assert ticks == ["llama-base", "llama-ft0", "llama-ft1", "merged"]
    assert "perplexity" in page.locator("#eval-chart .gtitle").text_content().lower()
    assert "broken-merge limit" in page.locator("#eval-caption").inner_text()
    header = page.locator("#eval-continuations th").evaluate_all("hs => hs.map(h => h.textContent.trim())")
    assert header == ["prompt", "llama-base", "llama-ft0", "llama-ft1", "merged"]
    assert page.locator("#eval-table").inner_text().count("llama-ft") == 2
    if os.environ.get("MERGESCOPE_EVAL_SCREENSHOT"):
        page.locator("#eval-status").scroll_into_view_if_needed()
        page.screenshot(path=os.environ["MERGESCOPE_EVAL_SCREENSHOT"], full_page=True)

