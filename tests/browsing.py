"""What the web-page tests share: Debian's Chromium under Playwright (never a downloaded
browser), the page opened on a live server, answers scripted in the API's own stream shape,
and where screenshots go (test-artifacts/page/, or $MIXTRAL_TEST_ARTIFACTS/page/)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mixtral.server import protocol

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MARKS = [pytest.mark.slow, pytest.mark.live,  # a browser against a live server
         pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium "
                            "(make test installs it)")]
ARTIFACTS = Path(os.environ.get("MIXTRAL_TEST_ARTIFACTS",
                                Path(__file__).parent.parent / "test-artifacts")) / "page"
PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1280, "height": 800}
MODEL = "mixtral-tiny-random"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def open_page(browser, url: str, viewport=DESKTOP, **context_options):
    """A fresh context (empty localStorage) with the page loaded and its model card shown."""
    context = browser.new_context(viewport=viewport, **context_options)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    page.errors = []  # uncaught script errors: a test ends by asserting there were none
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + "/")
    page.get_by_test_id("model").filter(has_text=MODEL).wait_for(state="attached")
    return page


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def scripted(page, *answers: str, piece: int = 7) -> list[dict]:
    """Answer the page's next chat requests with `answers` in turn, each streamed as the server
    streams (protocol.chunk events of `piece` characters, usage on the last); -> the request
    bodies the page sent, appended as they come."""
    sent: list[dict] = []
    queue = list(answers)

    def answer(route) -> None:
        sent.append(route.request.post_data_json)
        text = queue.pop(0)
        pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
        chunks = [protocol.chunk("id", 0, MODEL, {"role": "assistant", "content": ""})]
        chunks += [protocol.chunk("id", 0, MODEL, {"content": p}) for p in pieces[:-1]]
        chunks.append(protocol.chunk("id", 0, MODEL, {"content": pieces[-1]}, 0, "stop",
                                     protocol.usage(12, len(pieces))))
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", answer)
    return sent


def ask(page, text: str, finished: int) -> None:
    """Send `text` from the composer and wait until `finished` answers have ended."""
    page.get_by_test_id("input").fill(text)
    page.get_by_test_id("input").press("Enter")
    page.locator("[data-testid=assistant-message][data-finished]").nth(finished - 1).wait_for()
