"""Issue 14 in a real browser (Debian's headless Chromium through Playwright, one app on loopback for the module):
every change reaches the config (a clipboard paste, a fill), errors stay where they happened and keep the previous
results, Analyze shows progress and says Done only with its charts drawn, the page reads in order at 390, 1024 and
1400 px with no clipped label, the model list shrinks (remove, keep the first N), Apply fills the form with the
recommended method, and the merge's files are listed with full names and the table's sizes.

Screenshots of each width go to /tmp/mergescope-shots/ (override with MERGESCOPE_SHOTS): the whole page after
Analyze (``after-analyze-W.png``) and one screen from the diagnostics' heading (``screen-W.png``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from app_server import running_app

from merging.charts import CHARTS

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

SHOTS = Path(os.environ.get("MERGESCOPE_SHOTS", "/tmp/mergescope-shots"))
WIDTHS = {390: 844, 1024: 768, 1400: 1000}  # a phone, a laptop, a desktop: width -> height


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("cache")) as running:  # the demo zoo, as `python app.py` opens
        yield running


@pytest.fixture(scope="module")
def analyzed(chromium, served):
    """One desktop page after a good Analyze, shared in file order: read first, then Apply, then a failed Analyze."""
    context, page = open_page(chromium, served)
    assert "Done" in analyze_and_wait(page)
    yield page
    context.close()


def open_page(chromium, served, width: int = 1400, height: int = 1000, clipboard: bool = False):
    context = chromium.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    if clipboard:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=served.url.rstrip("/"))
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(served.url)
    page.wait_for_selector("#analyze-button")
    return context, page


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def yaml_text(page) -> str:
    return page.locator("#config-yaml .cm-content").inner_text()


def wait_yaml_has(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#config-yaml .cm-content').innerText.includes(t)", arg=text)


STATUS_TEXT = "(document.querySelector('#analyze-status .prose') || document.querySelector('#analyze-status')).innerText"
ANALYZE_ENDED = """before => {
  const status = """ + STATUS_TEXT + """;
  const pending = document.querySelector('#analyze-pending textarea, #analyze-pending input').value;
  const ended = (status.includes('Done') || status.includes('error:')) && !status.includes('Drawing');
  return ended && (status !== before.status || pending !== before.pending);
}"""


def analyze_and_wait(page) -> str:
    """Press Analyze and wait for this run's last word: its error, or Done once its charts are drawn."""
    before = page.evaluate("() => ({status: " + STATUS_TEXT + ", pending: "
                           "document.querySelector('#analyze-pending textarea, #analyze-pending input').value})")
    page.click("#analyze-button")
    page.wait_for_function(ANALYZE_ENDED, arg=before)
    return page.evaluate("() => " + STATUS_TEXT)


def stats_of_last_analysis(page) -> dict:
    with page.expect_download() as info:
        page.click("#stats-file")
    return json.loads(Path(info.value.path()).read_text())


def test_paste_and_fill_reach_the_yaml_and_the_next_analyze(chromium, served):
    context, page = open_page(chromium, served, clipboard=True)
    try:
        refs = list(served.demo.models.values())
        pasted, filled = f"./{refs[3]}", f"./{refs[5]}"  # the same checkpoints, new references
        page.evaluate("t => navigator.clipboard.writeText(t)", pasted)
        box = textbox(page, "model-0")
        box.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Control+V")
        wait_yaml_has(page, pasted)
        textbox(page, "model-1").fill(filled)
        wait_yaml_has(page, filled)
        models = [m["model"] for m in yaml.safe_load(yaml_text(page))["models"]]
        assert models[:2] == [pasted, filled] and refs[0] not in models
        assert "Done" in analyze_and_wait(page)
        assert stats_of_last_analysis(page)["meta"]["models"][:2] == [pasted, filled]
    finally:
        context.close()


def test_a_bad_model_id_leaves_a_persistent_error_in_the_diagnostics_and_no_done(chromium, served, caplog, capsys,
                                                                                 tmp_path):
    from merging.__main__ import main

    context, page = open_page(chromium, served)
    try:
        bad = "assets/zoo/digitz"
        textbox(page, "model-0").fill(bad)
        wait_yaml_has(page, bad)
        caplog.set_level(logging.INFO, logger="mergescope.app")
        status = analyze_and_wait(page)
        config = tmp_path / "bad.yml"
        config.write_text(yaml_text(page))
        capsys.readouterr()
        assert main(["analyze", str(config)]) == 2  # what the CLI says for the same config
        cli_line = capsys.readouterr().err.strip().replace("`", "")  # the page shows `code` as code
        assert cli_line in status and "'" in cli_line, (cli_line, status)
        column = page.evaluate("document.querySelector('#analyze-status').closest('.column') === "
                               "document.querySelector('#h-diagnostics').closest('.column')")
        assert column, "the error is not in the Diagnostics column"
        time.sleep(10)  # the one fixed wait: a popup would have faded by now
        status = page.locator("#analyze-status").inner_text()
        assert cli_line in status and "Done" not in status and "Traceback" not in status
        assert not page.locator("#diagnostics-charts .js-plotly-plot").count()
        lines = [r for r in caplog.records if r.name == "mergescope.app" and "digitz" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None and "\n" not in lines[0].getMessage()
    finally:
        context.close()


READING_ORDER = """() => {
  const ids = ['h-models', 'h-method', 'h-diagnostics', 'h-merge'];
  const els = ids.map((id) => document.getElementById(id));
  const dom = els.slice(1).every((e, i) => els[i].compareDocumentPosition(e) & Node.DOCUMENT_POSITION_FOLLOWING);
  const r = els.map((e) => e.getBoundingClientRect());
  const after = (a, b) => b.top >= a.bottom - 1 || b.left >= a.right - 1;  // below it, or in a column to its right
  return {dom, screen: r.slice(1).every((b, i) => after(r[i], b)), rects: r.map((x) => [x.left, x.top])};
}"""

CLIPPED_LABELS = r"""() => {
  const out = [];
  const sel = '[data-testid="block-info"], label span, button, .label-wrap span, th, [role="radio"] + span';
  for (const el of document.querySelectorAll(sel)) {
    if (!el.checkVisibility({visibilityProperty: true}) || !/\w/.test(el.textContent)) continue;
    if (el.closest('.sr-only')) continue;  // screen-reader labels are clipped on purpose
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const cs = getComputedStyle(el);
    if (cs.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1) out.push(el.textContent.trim() + ' (own box)');
    for (let a = el.parentElement; a; a = a.parentElement) {
      const ac = getComputedStyle(a);
      if (ac.overflowX !== 'visible') {
        const ar = a.getBoundingClientRect();
        if (r.right > ar.right + 1 || r.left < ar.left - 1) out.push(el.textContent.trim() + ' (clipped by its box)');
        break;
      }
    }
    if (r.right > window.innerWidth + 1) out.push(el.textContent.trim() + ' (past the window)');
  }
  if (document.documentElement.scrollWidth > window.innerWidth + 1) out.push('the page scrolls sideways');
  return out;
}"""


def check_reading_order(page, width: int) -> None:
    order = page.evaluate(READING_ORDER)
    assert order["dom"] and order["screen"], order
    assert page.evaluate(CLIPPED_LABELS) == []
    page.evaluate("window.scrollTo(0, document.getElementById('h-diagnostics').getBoundingClientRect().top"
                  " + window.scrollY)")
    merge = page.locator("#merge-button").bounding_box()
    assert merge["y"] + merge["height"] <= WIDTHS[width], "Merge is more than one screen below the diagnostics"
    assert page.locator("#merge-status").is_visible()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"screen-{width}.png"))  # what one screen shows from the diagnostics on
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")  # the merge bar back in its place
    page.screenshot(path=str(SHOTS / f"after-analyze-{width}.png"), full_page=True)
    page.evaluate("window.scrollTo(0, 0)")


@pytest.mark.parametrize("width", [w for w in WIDTHS if w != 1400])
def test_the_page_reads_in_order_without_clipped_labels(chromium, served, width):
    context, page = open_page(chromium, served, width, WIDTHS[width])
    try:
        assert "Done" in analyze_and_wait(page)
        check_reading_order(page, width)
    finally:
        context.close()


def test_the_desktop_page_reads_in_order_without_clipped_labels(analyzed):
    check_reading_order(analyzed, 1400)


def test_the_model_list_shrinks_and_keeps_the_first_n(chromium, served):
    context, page = open_page(chromium, served)
    try:
        refs = list(served.demo.models.values())
        visible = page.locator(".model-row:visible").count()
        page.click("#model-0-remove")
        page.wait_for_function("t => document.querySelector('#model-0 input').value === t", arg=refs[1])
        models = [m["model"] for m in yaml.safe_load(yaml_text(page))["models"]]
        assert models == refs[1:]
        assert page.locator(".model-row:visible").count() == visible - 1
        # slerp takes one model besides the base: the list says so and offers to keep the first
        page.locator("#method input").click()
        page.get_by_role("option", name="slerp", exact=True).click()
        page.wait_for_function("document.querySelector('#model-count').innerText.includes('exactly 1 model')")
        assert page.locator("#keep-first").inner_text() == "Keep the first 1"
        page.click("#keep-first")
        page.wait_for_function("document.querySelector('#model-1 input') === null || "
                               "document.querySelector('#model-1 input').value === ''")
        config = yaml.safe_load(yaml_text(page))
        assert config["merge_method"] == "slerp" and [m["model"] for m in config["models"]] == [refs[1]]
        page.wait_for_function("document.querySelector('#yaml-status').innerText.includes('Valid config')")
        assert not page.locator("#keep-first").is_visible()
    finally:
        context.close()


DRAWN_WHEN_DONE = """() => new Promise((resolve) => {
  const timer = setInterval(() => {
    if (!(""" + STATUS_TEXT + """).includes('Done')) return;
    clearInterval(timer);
    const run = JSON.parse(document.querySelector('#analyze-pending textarea, #analyze-pending input').value).run;
    resolve([...document.querySelectorAll('#diagnostics-charts .js-plotly-plot')].filter(
      (d) => d.layout && d.layout.meta.run === run && d.querySelector('.main-svg')).length);
  }, 10);
})"""


def test_analyze_shows_progress_and_says_done_once_the_charts_are_drawn(analyzed, served):
    page = analyzed  # a second Analyze on the shared page, slowed down to watch it
    page.evaluate("""() => { window.seenProgress = []; window.seenStatus = [];  // sampled in the page, every 20 ms
      window.progressTimer = setInterval(() => {
        for (const b of document.querySelectorAll('[role="progressbar"]')) window.seenProgress.push(b.ariaLabel || '');
        window.seenStatus.push(""" + STATUS_TEXT + """);
      }, 20); }""")
    served.settings.tensor_delay_s = 0.03  # the zoo's 55 tensors: about 2 s
    try:
        page.click("#analyze-button")
        page.wait_for_function("() => (" + STATUS_TEXT + ").includes('Analyzing')")  # the old Done is gone
        page.wait_for_function("() => !(" + STATUS_TEXT + ").includes('Analyzing')", timeout=60_000)
    finally:
        served.settings.tensor_delay_s = 0.0
    labels = page.evaluate("() => { clearInterval(window.progressTimer); return window.seenProgress; }")
    seen = [int(m.group(1)) for label in labels
            if (m := re.search(r"analyzing: (\d+)/(\d+) tensors · .* of .* · .* left", label))]
    assert len(set(seen)) >= 3 and min(seen) < max(seen), seen
    assert page.evaluate(DRAWN_WHEN_DONE) == len(CHARTS)  # at the moment "Done" appears, every chart of this run is drawn


def test_apply_fills_the_form_with_the_recommended_method(analyzed):
    from merging.advice import advise
    from merging.analysis import analyze
    from merging.config import parse_config

    page = analyzed
    expected = advise(analyze(parse_config(yaml_text(page), source="config")))["recommendation"]
    assert expected["method"] in page.locator("#advice-recommendation").inner_text()
    assert page.locator("#advice-findings li").count() >= 3
    page.click("#apply-advice")
    page.wait_for_function("m => document.querySelector('#method input').value === m", arg=expected["method"])
    wait_yaml_has(page, f"merge_method: {expected['method']}")
    assert yaml.safe_load(yaml_text(page)) == expected["config"]
    assert "Applied" in page.locator("#apply-status").inner_text()


def test_a_failed_analyze_after_a_good_one_keeps_the_old_charts(analyzed):
    page = analyzed
    runs = page.evaluate("[...document.querySelectorAll('#diagnostics-charts .js-plotly-plot')]"
                         ".map(d => d.layout.meta.run)")
    assert len(runs) == len(CHARTS) and len(set(runs)) == 1
    textbox(page, "model-0").fill("assets/zoo/nowhere")
    wait_yaml_has(page, "nowhere")
    status = analyze_and_wait(page)
    assert "error:" in status and "previous analysis" in status and "Done" not in status
    assert page.evaluate("[...document.querySelectorAll('#diagnostics-charts .js-plotly-plot')]"
                         ".map(d => d.layout.meta.run)") == runs
    assert page.locator("#diagnostics-charts .js-plotly-plot .main-svg").count() >= len(CHARTS)
    assert "From the previous analysis" in page.locator("#charts-note").inner_text()
    assert page.locator("#advice-panel").first.is_visible()  # the findings stay too
    assert page.locator("#diagnostics-charts, #advice-panel").get_by_text("Error", exact=True).count() == 0


def test_merge_lists_each_file_with_its_full_name_and_size_and_push_errors_stay(chromium, served, caplog):
    from components.common import human_bytes

    context, page = open_page(chromium, served)
    try:
        page.get_by_text("Push to the Hugging Face Hub").click()
        caplog.set_level(logging.INFO, logger="mergescope.app")
        page.click("#push-button")
        page.wait_for_function("document.querySelector('#push-status').innerText.includes('error:')")
        assert "merge first" in page.locator("#push-status").inner_text()
        records = [r for r in caplog.records if "merge first" in r.getMessage()]
        assert len(records) == 1 and records[0].exc_info is None  # one line, no traceback
        page.click("#merge-button")
        page.wait_for_selector("#merge-files a")
        rows = page.locator("#merge-files tbody tr").evaluate_all(
            "rs => rs.map(r => [r.querySelector('a').textContent, r.querySelector('a').getAttribute('download'),"
            " r.cells[1].textContent])")
        folder = next(p for p in served.sessions.root.rglob("merge-*") if p.is_dir())
        on_disk = {p.name: human_bytes(p.stat().st_size) for p in folder.iterdir()}
        assert {name: size for name, _, size in rows} == on_disk
        assert all(name == download for name, download, _ in rows)
        assert page.locator("#merge-files button").count() == 0  # outputs cannot be removed
        assert page.evaluate("[...document.querySelectorAll('#merge-files a')].every(a => a.scrollWidth <= "
                             "a.clientWidth + 1 || getComputedStyle(a).overflow === 'visible')")
        href = page.locator("#merge-files a", has_text="model.safetensors").get_attribute("href")
        assert page.request.get(served.url + href).body() == (folder / "model.safetensors").read_bytes()
    finally:
        context.close()
