"""The chat page's conversations in real headless Chromium, with answers scripted in the API's
stream shape (browsing.scripted): Markdown rendered and sanitized, conversations kept over a
reload, switched, renamed and deleted, regenerate and edit-and-resend, IME-safe Enter, and
finished answers announced to screen readers."""

from __future__ import annotations

import pytest
from browsing import MARKS, ask, browser, open_page, scripted, shot  # noqa: F401 (a fixture)

pytestmark = MARKS

RICH = """Here is **bold**, *emphasis* and `inline code`, with a [link](https://example.com).

- one
- two

```python
def answer():
    return 42
```
"""
# What a model could be prompted into writing: each line would run script in a page that
# assigned the model's text to innerHTML unsanitized
HOSTILE = "\n\n".join([
    '<script>window.pwned = "script"</script>',
    '<img src="x" onerror="window.pwned = \'onerror\'">',
    '<svg><animate onbegin="window.pwned = \'svg\'" attributeName="x" dur="1s"/></svg>',
    "[click me](javascript:window.pwned='link')",
    '<a href="javascript:window.pwned=\'anchor\'">anchor</a>',
    '<iframe src="javascript:parent.pwned=\'iframe\'"></iframe>',
    '<form action="javascript:window.pwned=\'form\'"><button>go</button></form>',
    "**still bold**"])
# what would run if it were there: script elements, handlers, javascript: URLs
RUNNABLE = """el => [...el.querySelectorAll("*")].flatMap(e => [
    ...(["SCRIPT", "IFRAME", "FORM", "OBJECT", "EMBED"].includes(e.tagName) ? [e.tagName] : []),
    ...[...e.attributes].filter(a => a.name.startsWith("on") ||
        /^\\s*javascript:/i.test(a.value)).map(a => `${e.tagName} ${a.name}=${a.value}`)])"""



def answers(page):
    return page.get_by_test_id("assistant-message")


def test_markdown_from_a_streamed_answer_becomes_elements(page):
    scripted(page, RICH)
    ask(page, "Show me some markdown", 1)
    text = answers(page).last.locator(".text")
    assert text.locator("strong").text_content() == "bold"
    assert text.locator("em").text_content() == "emphasis"
    assert text.locator("p > code").text_content() == "inline code"
    assert text.locator("li").all_text_contents() == ["one", "two"]
    link = text.locator("a")
    assert (link.get_attribute("href"), link.get_attribute("target"),
            link.get_attribute("rel")) == ("https://example.com", "_blank", "noopener noreferrer")
    code = text.locator("pre code")
    assert code.text_content() == "def answer():\n    return 42\n"
    assert code.locator(".hljs-keyword").first.text_content() == "def"  # highlighted
    text.get_by_test_id("copy-code").click()  # the block's own copy button
    assert page.evaluate("navigator.clipboard.readText()") == "def answer():\n    return 42\n"
    answers(page).last.get_by_test_id("copy").click()  # the whole answer, as written
    assert page.evaluate("navigator.clipboard.readText()") == RICH
    shot(page, "markdown")


@pytest.mark.parametrize("csp", ["bypassed", "enforced"])
def test_script_in_model_text_never_runs(browser, server, csp):  # noqa: F811
    # with the page's Content-Security-Policy bypassed, the sanitizer alone must hold
    page = open_page(browser, server.url, bypass_csp=csp == "bypassed")
    scripted(page, HOSTILE, piece=3)  # small pieces: every partial tag is rendered too
    ask(page, "Say something nasty", 1)
    text = answers(page).last.locator(".text")
    text.locator("a").first.click()  # links to javascript: lose their href
    text.locator("a").last.click()
    page.wait_for_timeout(1200)  # past the <animate>'s begin and the image's error
    assert page.evaluate("window.pwned") is None
    assert text.evaluate(RUNNABLE) == []
    assert text.locator("a").count() == 2  # the links are there, harmless
    assert text.locator("strong").text_content() == "still bold"
    assert page.errors == []
    page.context.close()


def test_reload_restores_and_the_list_switches_renames_and_deletes(page):
    scripted(page, "First answer.", "Second answer.")
    ask(page, "First chat", 1)
    page.get_by_test_id("new-chat").click()
    assert answers(page).count() == 0
    ask(page, "Second chat", 1)
    page.reload()
    page.get_by_test_id("assistant-message").first.wait_for()
    assert answers(page).last.locator(".text").inner_text() == "Second answer."
    assert page.get_by_test_id("chat-title").text_content() == "Second chat"
    chats = page.get_by_test_id("chat")
    assert chats.locator(".open").all_text_contents() == ["Second chat", "First chat"]
    chats.nth(1).locator(".open").click()  # switch
    assert answers(page).last.locator(".text").inner_text() == "First answer."
    chats.nth(1).get_by_role("button", name="Rename").click()
    page.get_by_label("New name").fill("Not kept")
    page.get_by_label("New name").press("Escape")  # cancels
    assert page.get_by_test_id("chat-title").text_content() == "First chat"
    chats.nth(1).get_by_role("button", name="Rename").click()
    page.get_by_label("New name").fill("Renamed")
    page.get_by_label("New name").press("Enter")
    assert page.get_by_test_id("chat-title").text_content() == "Renamed"
    delete = chats.nth(0).get_by_role("button", name="Delete")
    delete.click()
    assert chats.count() == 2  # the first click only asks
    delete.click()
    assert chats.locator(".open").all_text_contents() == ["Renamed"]
    page.reload()
    page.get_by_test_id("chat").first.wait_for()
    assert page.get_by_test_id("chat").locator(".open").all_text_contents() == ["Renamed"]
    shot(page, "conversations")


def test_regenerate_and_edit_and_resend(page):
    sent = scripted(page, "Answer one.", "Answer two.", "Answer three.")
    ask(page, "Question", 1)
    page.get_by_test_id("regenerate").click()
    page.locator("[data-testid=assistant-message][data-finished]").wait_for()
    assert answers(page).all_text_contents()[0].startswith("Answer two.")
    assert answers(page).count() == 1  # replaced, not added
    assert sent[1]["messages"] == sent[0]["messages"] == [{"role": "user", "content": "Question"}]
    page.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("Better question")
    shot(page, "editing")
    page.get_by_test_id("edit-send").click()
    page.locator("[data-testid=assistant-message][data-finished]").wait_for()
    assert page.get_by_test_id("user-message").all_text_contents()[0].startswith("Better question")
    assert answers(page).locator(".text").all_inner_texts() == ["Answer three."]
    assert sent[2]["messages"] == [{"role": "user", "content": "Better question"}]


def test_enter_that_confirms_an_ime_candidate_does_not_send(page):
    sent = scripted(page, "Okay.")
    box = page.get_by_test_id("input")
    box.fill("にほんご")
    for composing in ("isComposing: true", "keyCode: 229"):  # the flag, and Safari's old sign
        box.evaluate(f"""el => el.dispatchEvent(new KeyboardEvent("keydown",
            {{key: "Enter", bubbles: true, cancelable: true, {composing}}}))""")
    page.wait_for_timeout(300)
    assert sent == [] and box.input_value() == "にほんご"
    box.press("Enter")  # a plain Enter still sends
    page.locator("[data-testid=assistant-message][data-finished]").wait_for()
    assert sent[0]["messages"][-1]["content"] == "にほんご"


def test_finished_answers_are_announced_and_controls_are_labelled(page):
    scripted(page, "A **short** answer.")
    ask(page, "Hello", 1)
    assert page.get_by_test_id("announcer").get_attribute("aria-live") == "polite"
    assert page.get_by_test_id("announcer").text_content() == "A short answer."  # as shown
    unlabelled = page.evaluate("""() => [...document.querySelectorAll(
        "input, textarea, select, button")].filter(el => !el.labels?.length &&
        !el.getAttribute("aria-label") && !el.textContent.trim()).map(el => el.outerHTML)""")
    assert unlabelled == []
    assert page.get_by_label("Message").get_attribute("data-testid") == "input"
