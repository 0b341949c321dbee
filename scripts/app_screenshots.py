"""Screenshots of every tab of the running app, for the README: starts `python app.py`,
drives it with Playwright in Debian's Chromium, writes docs/screenshots/<tab>.png.

    python scripts/app_screenshots.py                  # shapes-opt
    python scripts/app_screenshots.py --model PATH --out docs/screenshots
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from app_fixture import AppProcess  # noqa: E402

ASSETS = ROOT / "assets" / "examples"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("BLIP2LAB_MODEL", "shapes-opt"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = AppProcess(args.model, out / ".app.log", gallery_size=1000,
                     BLIP2LAB_MODELS="shapes-opt,shapes-t5,mini-real").wait()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(app.url, wait_until="load")

            # Chat: the held-out example, two turns; each answer names its model (and what it never saw).
            page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "novel-purple-triangle.png"))
            expect(page.locator("#chat-input img")).to_have_count(1)
            for n, question in enumerate(("how many shapes are there?", "is there a purple triangle?"), 1):
                page.locator("#chat-input textarea").fill(question)
                page.locator("#chat-input textarea").press("Enter")
                expect(page.locator("#chatbot [data-testid=user]").last).to_contain_text(question)
                expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(n)
            page.wait_for_timeout(500)
            page.screenshot(path=out / "chat.png", full_page=True)

            # Caption & attention.
            page.get_by_role("tab", name="Caption & attention").click()
            page.locator("#caption-image input[type=file]").set_input_files(str(ASSETS / "three-shapes.png"))
            expect(page.locator("#caption-image img")).to_have_count(1)
            page.get_by_role("button", name="Caption and maps").click()
            expect(page.locator("#gradcam-overlay img")).to_have_count(1)
            page.wait_for_timeout(800)
            page.screenshot(path=out / "caption_attention.png", full_page=True)

            # Search.
            page.get_by_role("tab", name="Search").click()
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.locator("#search-status")).to_contain_text("re-ranked by ITM")
            page.wait_for_timeout(800)
            page.screenshot(path=out / "search.png", full_page=True)

            # Scene composer.
            page.get_by_role("tab", name="Scene composer").click()
            page.get_by_label("…or describe it").fill(
                "a large red circle on the top left and a small purple triangle on the bottom right")
            page.get_by_role("button", name="Compose from description").click()
            expect(page.locator("#scene-image img")).to_have_count(1)
            page.wait_for_timeout(500)
            page.screenshot(path=out / "scene_composer.png", full_page=True)

            # Model.
            page.get_by_role("tab", name="Model").click()
            page.wait_for_timeout(500)
            page.screenshot(path=out / "model.png", full_page=True)
            browser.close()
    finally:
        app.stop()
        (out / ".app.log").unlink(missing_ok=True)
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))


if __name__ == "__main__":
    main()
