"""The browser path works: system Chromium, launched by Playwright, loads a local page and runs its script."""

from __future__ import annotations

import pytest
from browser import chromium_missing_reason, launch_chromium, serve_directory

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>Mergescope smoke</title></head>
<body>
  <button id="go" type="button">Merge</button>
  <p id="out">idle</p>
  <script>
    let clicks = 0;
    document.getElementById("go").addEventListener("click", () => {
      clicks += 1;
      document.getElementById("out").textContent = "merged " + clicks;
    });
  </script>
</body>
</html>
"""


def test_browser_smoke(tmp_path):
    reason = chromium_missing_reason()
    if reason:
        pytest.fail(reason)  # tests/run.sh installs both; a silent skip would hide a broken CI
    from playwright.sync_api import expect, sync_playwright

    (tmp_path / "index.html").write_text(PAGE, encoding="utf-8")
    with serve_directory(tmp_path) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            response = page.goto(f"{url}/index.html", wait_until="load")
            assert response is not None and response.ok
            assert page.title() == "Mergescope smoke"
            assert page.text_content("#out") == "idle"

            page.click("#go")
            expect(page.locator("#out")).to_have_text("merged 1")
            page.get_by_role("button", name="Merge").click()
            expect(page.locator("#out")).to_have_text("merged 2")
            assert page.evaluate("clicks") == 2
        finally:
            browser.close()
