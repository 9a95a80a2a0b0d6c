"""The chat page's layout in real headless Chromium at a desktop's 1280x800 and a phone's 390x844,
in the light and dark schemes: nothing scrolls sideways, every control can be reached (the
sidebar is a drawer on the phone), the system's scheme is followed unless the theme button
overrides it. Each state is saved as a screenshot in test-artifacts/page/."""

from __future__ import annotations

import pytest
from browsing import DESKTOP, MARKS, PHONE, ask, browser, open_page, scripted, shot  # noqa: F401
from serving import LiveServer

pytestmark = MARKS

ANSWER = """A long line of code must scroll inside its block, not the page:

```python
print("%s" % "a very long string that goes on and on, far past the width of any phone screen")
```

| a table | with | several | columns | that | could | be | wide |
|---|---|---|---|---|---|---|---|
| 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 |

Averyveryverylongwordwithoutanyspacesthatcouldpushthelayoutsidewaysifnothingwrappedit."""
SIZES = {"desktop": DESKTOP, "phone": PHONE}
DARK_BG, LIGHT_BG = "rgb(22, 23, 26)", "rgb(246, 246, 244)"
# a control is reachable if it lies inside the viewport once scrolled to, and a click at its
# centre lands on it (nothing covers it)
REACHABLE = """el => {
  el.scrollIntoView({block: "center"});
  const r = el.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;
  const hit = document.elementFromPoint(x, y);
  return r.width > 0 && r.left >= 0 && r.right <= innerWidth && r.top >= 0 &&
         r.bottom <= innerHeight && (hit === el || el.contains(hit) || hit?.control === el);
}"""
SIDEBAR = ["new-chat", "system", "temperature", "top-p", "max-tokens", "seed",
           "stop-sequences", "safe-prompt", "json-mode", "api-key"]
MAIN = ["theme", "input", "send"]


@pytest.fixture(scope="module")
def server():
    s = LiveServer()
    yield s
    s.stop()


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= innerWidth && "
                         "document.body.scrollWidth <= innerWidth")


def background(page) -> str:
    return page.evaluate("getComputedStyle(document.body).backgroundColor")


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", SIZES)
def test_layout_fits_and_every_control_is_reachable(browser, server, size, scheme):  # noqa: F811
    page = open_page(browser, server.url, viewport=SIZES[size], color_scheme=scheme)
    assert background(page) == (DARK_BG if scheme == "dark" else LIGHT_BG)
    scripted(page, ANSWER)
    ask(page, "Show me something wide", 1)
    assert no_sideways_scroll(page)
    for control in MAIN:
        assert page.get_by_test_id(control).evaluate(REACHABLE), control
    shot(page, f"{size}-{scheme}")
    if size == "phone":
        sidebar = page.get_by_test_id("sidebar")
        assert not sidebar.is_visible() or not sidebar.evaluate(REACHABLE)  # a closed drawer
        page.get_by_test_id("menu").click()
        page.get_by_test_id("close-drawer").wait_for()
        page.wait_for_timeout(300)  # the slide-in
        shot(page, f"{size}-{scheme}-drawer")
    for control in SIDEBAR + ["chat"]:
        assert page.get_by_test_id(control).first.evaluate(REACHABLE), control
    assert no_sideways_scroll(page)
    if size == "phone":
        page.keyboard.press("Escape")  # closes the drawer, back to the conversation
        page.get_by_test_id("input").wait_for()
        page.wait_for_timeout(300)
        assert page.get_by_test_id("input").evaluate(REACHABLE)
        assert page.get_by_test_id("menu").get_attribute("aria-expanded") == "false"
    assert page.errors == []
    page.context.close()


def test_stop_is_reachable_on_the_phone_while_answering(browser, server):  # noqa: F811
    page = open_page(browser, server.url, viewport=PHONE)
    page.get_by_test_id("input").fill("Hello")
    page.route("**/v1/chat/completions", lambda route: None)  # an answer that never comes
    page.get_by_test_id("send").click()
    stop = page.get_by_test_id("stop")
    assert stop.is_enabled() and stop.evaluate(REACHABLE)
    stop.click()
    page.locator("[data-testid=assistant-message][data-finished=stopped]").wait_for()
    page.context.close()


def test_theme_button_overrides_the_system_and_is_remembered(browser, server):  # noqa: F811
    page = open_page(browser, server.url, color_scheme="dark")
    theme = page.get_by_test_id("theme")
    assert theme.text_content().endswith("System") and background(page) == DARK_BG
    theme.click()
    assert theme.text_content().endswith("Light") and background(page) == LIGHT_BG
    page.reload()
    page.get_by_test_id("theme").filter(has_text="Light").wait_for()
    assert background(page) == LIGHT_BG
    page.get_by_test_id("theme").click()
    assert background(page) == DARK_BG
    shot(page, "desktop-dark-by-button")
    page.context.close()
