"""The web chat page in real headless Chromium (Debian's, driven by Playwright; no download)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from serving import LiveServer, Slow

from mixtral import chat
from mixtral.server.app import json_constraints

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.live,  # a browser against a live server
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium "
                                 "(make test installs it)")]
ARTIFACTS = Path(os.environ.get("MIXTRAL_TEST_ARTIFACTS",
                                Path(__file__).parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def server():
    s = LiveServer(load=lambda: Slow(delay=0.03), json_constraint=json_constraints())
    prompts = []
    job = s.state.engine.job  # every choice of every request is made here, then queued
    s.state.engine.job = lambda p, *a, **k: prompts.append(p) or job(p, *a, **k)
    s.prompts = prompts
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page.goto(server.url + "/")
    page.get_by_test_id("model").filter(has_text="mixtral-tiny-random").wait_for()
    yield page
    context.close()


def last_answer(page):
    return page.get_by_test_id("assistant-message").last


def test_chat_streams_and_stops(page, server):
    page.get_by_test_id("system").fill("Be brief.")
    page.get_by_test_id("max-tokens").fill("400")  # ~12 s at this speed: time to stop it
    page.get_by_test_id("input").fill("Hello there")
    page.get_by_test_id("input").press("Enter")
    answer = last_answer(page).locator(".text")
    page.wait_for_function("el => el.textContent.length > 0", arg=answer.element_handle())
    first = len(answer.text_content())
    page.wait_for_timeout(400)
    assert len(answer.text_content()) > first  # text arrives while generating: streamed
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-streaming.png"))
    page.get_by_test_id("stop").click()
    page.wait_for_selector("[data-testid=assistant-message][data-finished=stopped]")
    deadline = time.monotonic() + 3
    while server.state.engine.busy:  # stopping in the page frees the engine at once
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert page.get_by_test_id("send").is_enabled()
    assert server.prompts[-1] == chat.encode([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello there"}])
    page.screenshot(path=str(ARTIFACTS / "chat-stopped.png"))


def test_multi_turn_safe_prompt_json_and_copy(page, server):
    page.get_by_test_id("max-tokens").fill("3")
    page.get_by_test_id("input").fill("First question")
    page.get_by_test_id("send").click()
    page.wait_for_selector("[data-testid=assistant-message][data-finished=true]")
    first_answer = last_answer(page).locator(".text").text_content()
    page.get_by_test_id("safe-prompt").check()
    page.get_by_test_id("json-mode").check()
    page.get_by_test_id("max-tokens").fill("60")
    page.get_by_test_id("input").fill("Answer in JSON")
    page.get_by_test_id("send").click()
    page.wait_for_selector("[data-testid=assistant-message]:nth-child(4)[data-finished=true]")
    answer = last_answer(page).locator(".text").text_content()
    assert isinstance(json.loads(answer), dict)  # JSON mode: always parses
    history = [{"role": "user", "content": "First question"},
               {"role": "assistant", "content": first_answer},
               {"role": "user", "content": "Answer in JSON"}]
    assert server.prompts[-1] == chat.encode(history, safe_prompt=True)  # both turns went in
    last_answer(page).get_by_test_id("copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == answer


def test_server_errors_are_shown(page):
    page.get_by_test_id("max-tokens").fill("999999")  # beyond the context: a 400
    page.get_by_test_id("input").fill("Hello")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "Server error 400" in error.text_content()
    assert "exceeds the model's context of 2048 tokens" in error.text_content()
    page.screenshot(path=str(ARTIFACTS / "chat-error.png"))
