"""A real browser against a real server: Debian's headless Chromium driven by Playwright.

A person uploads a photo, types a description, and sees the gallery; a bad upload shows the service's
message. Screenshots are kept under ``artifacts/`` (git-ignored) for a human to look at. Skips with the
reason when Chromium or Playwright is missing (``make browser`` installs Chromium; never
``playwright install``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.live import LiveServer, live_server  # noqa: F401  (session fixture)
from tests.conftest import REPO
from tests.e2e.browser import open_tab

pytestmark = pytest.mark.browser
ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def page(live_server: LiveServer) -> Iterator:  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    yield from open_tab(live_server.url, height=1000)


def _results(page) -> int:  # type: ignore[no-untyped-def]
    return page.locator("#results img").count()


def test_photo_then_text_search_fills_the_gallery(page, live_server: LiveServer) -> None:  # noqa: F811
    header = page.locator("#vitrine-version").inner_text()
    assert "version" in header and "24 images" in header

    page.locator("#query-image input[type=file]").set_input_files(
        str(live_server.catalog / "images" / "p003.jpg")
    )
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    status = page.locator("#vitrine-status").inner_text()
    assert "12 matches" in status
    # the photo itself is in the index: it must come back first, with a perfect score
    first_caption = page.locator("#results").inner_text()
    assert "pattern number 3" in first_caption and "1.000" in first_caption

    page.locator("#query-text textarea").fill("pattern number 7")
    page.locator("#query-text textarea").press("Enter")
    page.wait_for_function(
        "document.querySelector('#vitrine-status').innerText.includes('matches')"
        " && !document.querySelector('#results').innerText.includes('1.000')"
    )
    assert _results(page) == 12
    # the photo stays in the box, so the text refines it (photo + text, by design): the curl line says so
    page.locator("#api-response").get_by_text("API response (JSON)").first.click()
    curl = page.locator("#curl-line .cm-content").inner_text()
    assert "/api/v1/search/image -F image=@photo.jpg" in curl and "text=pattern number 7" in curl, curl
    table = page.locator("table.vitrine-table").inner_text()
    assert "shop" in table and "color" in table  # metadata shown beside the gallery
    page.screenshot(path=str(ARTIFACTS / "browser-search.png"), full_page=True)

    # click a result: "more like this" puts that item first, with a perfect score
    page.locator("#results img").nth(2).click()
    page.wait_for_function("document.querySelector('#results').innerText.includes('1.000')")
    assert _results(page) == 12


def test_bad_upload_shows_the_message_and_server_keeps_answering(
    page,
    live_server: LiveServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is a text file pretending to be a PNG\n" * 20)
    page.locator("#query-image input[type=file]").set_input_files(str(bad))
    toast = page.get_by_text("cannot read the uploaded image", exact=False)
    toast.first.wait_for(state="visible")
    page.wait_for_timeout(600)  # let the toast finish fading in before the screenshot
    page.screenshot(path=str(ARTIFACTS / "browser-bad-upload.png"), full_page=True)
    assert "not an image" in toast.first.inner_text()

    from gradio_client import Client

    result = Client(live_server.url, verbose=False, download_files=False).predict(
        "pattern number 1", 3, {}, api_name="/search_text"
    )
    assert len(result["hits"]) == 3


def test_drift_tab_runs_a_check_and_shows_the_verdict(page, live_server: LiveServer) -> None:  # noqa: F811
    page.goto(live_server.url)  # a fresh page: no toasts left from earlier tests
    page.get_by_role("tab", name="Drift").click()
    summary = page.locator("#drift-summary")
    summary.wait_for(state="visible")
    verdict = "document.querySelector('#drift-summary').innerText"
    assert page.locator("#drift-check").is_disabled(), "a check writes a report: it needs --admin"
    assert page.locator("#drift-reindex").is_disabled(), "reindexing from the page needs --admin"
    from vitrine.drift.assess import assess
    from vitrine.drift.journal import Journal

    journal = Journal(live_server.index)
    for _ in range(2):  # two reports (as `python -m indexer drift` writes them) draw a line in the plot
        journal.add_report(assess(live_server.index, journal=journal).to_dict())
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function(f"['No drift', 'Drift detected'].some(w => {verdict}.includes(w))")
    # the live generation's quality from its own captions (measured in the background, shown on refresh)
    page.wait_for_function(f"{verdict}.includes('24 captioned items')", timeout=60_000)
    page.wait_for_timeout(1200)
    text = summary.inner_text()
    assert "gen-000001" in text and "24 of 24 items" in text and "text→image R@10" in text
    page.screenshot(path=str(ARTIFACTS / "browser-drift.png"), full_page=True)
    page.get_by_role("tab", name="Search").click()
