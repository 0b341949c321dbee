"""The app in a real browser: Debian's Chromium (/usr/bin/chromium, headless, no sandbox,
background networking off) driven by Playwright against `python app.py` on 127.0.0.1.
One chat turn, one caption with its maps, one search; a screenshot of each step is saved
in the test's output folder. The browser is never downloaded (no `playwright install`):
`make test` installs Debian's chromium when it is missing."""

import pytest
from app_fixture import ROOT, running_app
from playwright.sync_api import expect, sync_playwright

ASSETS = ROOT / "assets" / "examples"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app"), gallery_size=100) as app:
        yield app


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url, wait_until="load")
        expect(page.get_by_role("tab", name="Caption & attention")).to_be_visible()
        try:
            yield page
        finally:
            browser.close()


def test_one_chat_turn(page, tmp_path):
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "red-circle.png"))
    expect(page.locator("#chat-input img")).to_have_count(1)  # the upload is in the box
    box = page.locator("#chat-input textarea")
    box.fill("what color is the circle?")
    box.press("Enter")
    answer = page.locator("#chatbot [data-testid=bot]").last
    expect(answer).to_be_visible()
    expect(page.locator("#chatbot [data-testid=user]").last).to_contain_text("what color is the circle?")
    page.screenshot(path=tmp_path / "chat.png", full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 0


def test_one_caption_with_maps(page, tmp_path):
    page.get_by_role("tab", name="Caption & attention").click()
    page.locator("#caption-image input[type=file]").set_input_files(str(ASSETS / "three-shapes.png"))
    expect(page.locator("#caption-image img")).to_have_count(1)
    page.get_by_role("button", name="Caption and maps").click()
    expect(page.locator("#attention-overlay img")).to_have_count(1)
    expect(page.locator("#gradcam-overlay img")).to_have_count(1)
    assert page.locator("#query-maps img").count() >= 1
    expect(page.locator("#caption-text textarea")).not_to_have_value("")
    page.screenshot(path=tmp_path / "caption.png", full_page=True)


def test_one_search(page, tmp_path):
    page.get_by_role("tab", name="Search").click()
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-status")).to_contain_text("ranked by")
    expect(page.locator("#search-results img")).to_have_count(8)
    page.screenshot(path=tmp_path / "search.png", full_page=True)
