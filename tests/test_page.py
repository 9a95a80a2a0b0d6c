"""The web chat page in real headless Chromium against the real server (the tiny random model):
streaming and stop, multi-turn with safe prompt and JSON mode, errors, the model card, and a
page that asks nothing of any other origin."""

from __future__ import annotations

import json
import re
import time

import pytest
from browsing import MARKS, MODEL, browser, shot  # noqa: F401 (a fixture)
from serving import LiveServer, Slow

from mixtral import chat
from mixtral.server.app import json_constraints

pytestmark = MARKS


@pytest.fixture(scope="module")
def server():
    s = LiveServer(load=lambda: Slow(delay=0.03), json_constraint=json_constraints())
    prompts = []
    job = s.state.engine.job  # every choice of every request is made here, then queued
    s.state.engine.job = lambda p, *a, **k: prompts.append(p) or job(p, *a, **k)
    s.prompts = prompts
    yield s
    s.stop()



def last_answer(page):
    return page.get_by_test_id("assistant-message").last


def stored(page) -> list[dict]:
    """The current conversation's messages as the page keeps them in localStorage."""
    data = json.loads(page.evaluate("localStorage.getItem('mixtral-chats')"))
    return next(c for c in data["chats"] if c["id"] == data["current"])["messages"]


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
    shot(page, "real-streaming")
    page.get_by_test_id("stop").click()
    page.wait_for_selector("[data-testid=assistant-message][data-finished=stopped]")
    deadline = time.monotonic() + 3
    while server.state.engine.busy:  # stopping in the page frees the engine at once
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert page.get_by_test_id("send").is_enabled()
    assert server.prompts[-1] == chat.encode([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello there"}])
    assert stored(page)[-1]["finish"] == "stopped"  # a stopped answer is kept, marked so
    shot(page, "real-stopped")


def test_multi_turn_safe_prompt_json_and_copy(page, server):
    page.get_by_test_id("max-tokens").fill("3")
    page.get_by_test_id("input").fill("First question")
    page.get_by_test_id("send").click()
    page.wait_for_selector("[data-testid=assistant-message][data-finished=true]")
    first_answer = stored(page)[-1]["content"]
    page.get_by_test_id("safe-prompt").check()
    page.get_by_test_id("json-mode").check()
    page.get_by_test_id("max-tokens").fill("60")
    page.get_by_test_id("input").fill("Answer in JSON")
    page.get_by_test_id("send").click()
    page.wait_for_selector("[data-testid=assistant-message]:nth-child(4)[data-finished=true]")
    answer = stored(page)[-1]["content"]
    assert isinstance(json.loads(answer), dict)  # JSON mode: always parses
    # shown as code; JSON mode's whitespace may include \r, which the DOM's text turns into \n
    shown = answer.replace("\r\n", "\n").replace("\r", "\n")
    assert last_answer(page).locator("pre code").text_content() == shown
    history = [{"role": "user", "content": "First question"},
               {"role": "assistant", "content": first_answer},
               {"role": "user", "content": "Answer in JSON"}]
    assert server.prompts[-1] == chat.encode(history, safe_prompt=True)  # both turns went in
    last_answer(page).get_by_test_id("copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == answer
    stats = last_answer(page).locator(".info").text_content()
    assert "s to first token" in stats and "completion tokens" in stats
    # a rate needs tokens after the first, arriving later (answer.js): a 2-token answer's
    # tokens may come in one chunk (the tiny random model's JSON is sometimes just "{}")
    completion = int(re.search(r"(\d+) completion tokens", stats)[1])
    assert ("tokens/s" in stats) or completion <= 2, stats


def test_top_p_seed_and_stop_reach_the_server(page, server):
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and
            sent.append(r.post_data_json))
    page.get_by_test_id("top-p").fill("0.5")
    page.get_by_test_id("seed").fill("42")
    page.get_by_test_id("stop-sequences").fill("END\n\\n\\n")
    page.get_by_test_id("max-tokens").fill("5")
    page.get_by_test_id("input").fill("Hi")
    page.get_by_test_id("send").click()
    page.wait_for_selector("[data-testid=assistant-message][data-finished=true]")
    assert (sent[0]["top_p"], sent[0]["random_seed"], sent[0]["stop"]) == (0.5, 42,
                                                                          ["END", "\n\n"])
    page.reload()  # the settings are kept across reloads
    page.get_by_test_id("model").filter(has_text=MODEL).wait_for()
    assert page.get_by_test_id("seed").input_value() == "42"
    assert page.get_by_test_id("top-p").input_value() == "0.5"


def test_server_errors_are_shown(page):
    page.get_by_test_id("max-tokens").fill("999999")  # beyond the context: a 400
    page.get_by_test_id("input").fill("Hello")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "Server error 400" in error.text_content()
    assert "exceeds the model's context of 2048 tokens" in error.text_content()
    shot(page, "real-error")


def test_model_card_facts(page, server):
    card = page.get_by_test_id("model").inner_text()
    for fact in (MODEL, "4.5M (4.2M per token)", "float32, not quantized", "2,048 tokens"):
        assert fact in card


def test_the_page_reaches_no_other_origin(browser, server):  # noqa: F811
    requests = []
    context = browser.new_context()
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    response = page.goto(server.url + "/")
    page.get_by_test_id("model").filter(has_text=MODEL).wait_for()
    assert all(url.startswith(server.url) for url in requests), requests
    assert sorted({url.removeprefix(server.url) for url in requests}) == ["/", "/v1/models"]
    policy = response.headers["content-security-policy"]
    assert "connect-src 'self'" in policy and "script-src 'sha256-" in policy
    context.close()
