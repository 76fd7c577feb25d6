"""The Learn view in a real browser (Debian's headless Chromium through Playwright, the app on loopback): open the
section, the table chart renders, set λ and the per-task chart changes to the new λ's accuracies."""

from __future__ import annotations

import os
import time

import pytest
from app_server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("cache")) as running:
        yield running




def bar_heights(page, elem_id: str) -> list[float]:
    """The y values of the first trace of the Plotly chart inside ``#elem_id`` (what the browser drew)."""
    return page.evaluate(f"() => Array.from(document.querySelector('#{elem_id} .js-plotly-plot').data[0].y)")


def test_learn_section_shows_the_table_and_follows_the_lambda_slider(chromium, served):
    from components import learn_panel

    if not learn_panel.zoo_available():
        pytest.skip("the committed zoo (assets/zoo) is missing")
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(served.url)
        page.get_by_text("Learn: what merging does").click()
        page.wait_for_selector("#learn-table .js-plotly-plot .main-svg")
        table_title = page.locator("#learn-table .gtitle").text_content()
        assert "Merging methods on the zoo" in table_title
        table = learn_panel.table_data()
        rows = [r for r in table["rows"] if r["status"] == "ok"]
        assert bar_heights(page, "learn-table") == [r["label"] for r in rows]  # horizontal bars: labels on y

        page.wait_for_selector("#learn-lambda-chart .js-plotly-plot .main-svg")
        at_03 = learn_panel.lambda_update(0.3)
        assert bar_heights(page, "learn-lambda-chart") == pytest.approx([100 * v for v in at_03["accuracy"].values()])
        page.wait_for_selector("#learn-barrier .js-plotly-plot")
        page.wait_for_selector("#learn-emr .js-plotly-plot")

        number = page.locator("#learn-lambda input[type=number]")
        number.fill("0.7")
        number.press("Enter")
        started = time.monotonic()
        page.wait_for_function(
            "() => document.querySelector('#learn-lambda-chart .gtitle').textContent.includes('λ = 0.70')")
        print(f"\nλ 0.3 → 0.7 in the browser: chart redrawn after {time.monotonic() - started:.2f} s")
        at_07 = learn_panel.lambda_update(0.7)
        assert bar_heights(page, "learn-lambda-chart") == pytest.approx([100 * v for v in at_07["accuracy"].values()])
        assert at_07["accuracy"] != at_03["accuracy"]
        assert "λ = 0.70" in page.locator("#learn-lambda-status").inner_text()

        page.locator("#learn-lambda input[type=range]").fill("0.5")  # the slider itself (sets it, fires input)
        page.wait_for_function(
            "() => document.querySelector('#learn-lambda-chart .gtitle').textContent.includes('λ = 0.50')")
        at_05 = learn_panel.lambda_update(0.5)
        assert bar_heights(page, "learn-lambda-chart") == pytest.approx([100 * v for v in at_05["accuracy"].values()])
        if os.environ.get("MERGESCOPE_LEARN_SCREENSHOT"):  # a picture of the section, for the docs
            time.sleep(0.5)
            page.locator("#learn").screenshot(path=os.environ["MERGESCOPE_LEARN_SCREENSHOT"])
    finally:
        context.close()
