"""The chat page in a real browser: Debian's Chromium driven by Playwright, against the real node.

Screenshots go to test-artifacts/ (not committed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from gguf_appliance.api.endpoint import event_json
from gguf_appliance.api.sse import PING, frame

from .conftest import RunningServer, slot_held, wait_until
from .sse import cut_at

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
STORY = "Write a very long story about a dragon and a knight."


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 900, "height": 800})
    tab = context.new_page()
    yield tab
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def test_answer_streams_in_several_steps_with_stats(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    expect(page.locator("#status")).to_contain_text("Ready · SmolLM2-135M-Instruct.Q4_1")
    # Count how often the answer's text changes while it streams.
    page.evaluate("""() => {
        window.__changes = 0;
        new MutationObserver(() => window.__changes++).observe(
            document.getElementById('log'), {subtree: true, characterData: true, childList: true});
    }""")
    send(page, "Tell me about the sea in three sentences.")
    answer = page.locator("#log li.assistant").first
    expect(answer.locator(".stats")).to_contain_text("tokens · first token", timeout=30_000)
    assert page.evaluate("window.__changes") >= 5
    assert len(answer.inner_text()) > 40
    expect(page.locator("#log li.user .content").first).to_have_text(
        "Tell me about the sea in three sentences."
    )
    # Shift+Enter makes a new line instead of sending.
    page.focus("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    shot(page, "chat")


def test_stop_ends_the_answer_and_the_server_stops(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "1500")
    send(page, STORY)
    answer = page.locator("#log li.assistant").first
    expect(answer).not_to_have_text("", timeout=30_000)
    assert server.metric("gguf_appliance_busy_slots") == 1
    page.click("#stop")
    expect(answer.locator(".stats")).to_have_text("stopped")
    wait_until(lambda: server.metric("gguf_appliance_busy_slots") == 0, 10, "the slot never freed")
    tokens = server.metric("gguf_appliance_completion_tokens_total")
    # The window is the test: nothing more is generated over the next half second.
    time.sleep(0.5)
    assert server.metric("gguf_appliance_completion_tokens_total") == tokens


def test_japanese_renders_intact(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    page.click("#settings-toggle")
    page.locator("#temperature").fill("0")  # greedy: the answer below is known to be Japanese
    page.fill("#max-tokens", "48")
    mine = "日本語で挨拶してください。こんにちは、世界!🙂"
    send(page, mine)
    expect(page.locator("#log li.user .content").first).to_have_text(mine)
    expect(page.locator("#log li.assistant .stats").first).to_be_visible(timeout=30_000)
    send(page, "Translate to Japanese: Good morning, my friend.")
    answer = page.locator("#log li.assistant").nth(1)
    expect(answer.locator(".stats")).to_be_visible(timeout=30_000)
    text = answer.locator(".content").inner_text()
    assert any("\u3040" <= ch <= "\u9fff" for ch in text), text  # kana or kanji came out
    assert "\ufffd" not in text  # no character broken across tokens
    shot(page, "japanese")


def test_markup_in_messages_and_answers_runs_nothing(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    send(page, evil)
    expect(page.locator("#log li.user .content").first).to_have_text(evil)
    expect(page.locator("#log li.assistant .stats").first).to_be_visible(timeout=30_000)

    # The model cannot be made to answer with markup on demand, so here (only here) the server's
    # reply is replaced by a stream that carries it; the page code under test is the real one.
    def hostile(route: Route) -> None:
        frames = [
            'event: token\ndata: {"text": "<img src=x onerror=\\"window.__pwned=3\\">"}\n\n',
            'event: token\ndata: {"text": "<script>window.__pwned=4</script><b>bold?</b>"}\n\n',
            'event: done\ndata: {"finish_reason": "stop", "completion_tokens": 2, '
            '"time_to_first_token": 0.1, "tokens_per_second": 10}\n\n',
        ]
        route.fulfill(status=200, content_type="text/event-stream", body="".join(frames))

    page.route("**/generate", hostile)
    send(page, "answer with markup")
    answer = page.locator("#log li.assistant").nth(1)
    expect(answer).to_contain_text('<img src=x onerror="window.__pwned=3">')
    expect(answer).to_contain_text("<b>bold?</b>")
    # Had the markup made an <img src=x>, its onerror would run once loading x fails. An image
    # of our own with the same src, made after theirs, fails too: once its handler has run, theirs
    # would have. (It marks the page rather than a variable for wait_for_function to poll: that
    # polls with eval, which the page's CSP refuses.)
    page.evaluate("""() => {
        const control = new Image();
        control.onerror = () => { document.documentElement.dataset.controlFailed = 'yes'; };
        control.src = 'x';
    }""")
    expect(page.locator("html")).to_have_attribute("data-control-failed", "yes")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#log img, #log script, #log b").count() == 0


def test_busy_node_shows_when_to_retry(page: Page, start_server: Any) -> None:
    node = start_server(n_slots=1, queue_size=0, retry_after=9)
    with slot_held(node):
        page.goto(node.base_url + "/")
        send(page, "hello")
        error = page.locator("#log li.error")
        expect(error).to_contain_text("The node is busy right now")
        expect(error).to_contain_text("Try again in 9 s.")
        shot(page, "busy")


def test_settings_are_remembered(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    page.click("#settings-toggle")
    page.fill("#system-prompt", "Answer like a pirate.")
    page.fill("#max-tokens", "77")
    page.locator("#temperature").fill("1.3")
    page.reload()
    assert page.input_value("#system-prompt") == "Answer like a pirate."
    assert page.input_value("#max-tokens") == "77"
    assert page.input_value("#temperature") == "1.3"


def test_network_loss_is_a_plain_message(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    page.route("**/generate", lambda route: route.abort("internetdisconnected"))
    send(page, "hello")
    expect(page.locator("#log li.error")).to_contain_text("The network failed")


def test_usable_on_a_phone(browser: Browser, server: RunningServer) -> None:
    context = browser.new_context(
        viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True
    )
    phone = context.new_page()
    phone.goto(server.base_url + "/")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 375  # nothing wider than the screen
    assert phone.locator("#send").is_visible() and phone.locator("#stop").is_visible()
    shot(phone, "phone")
    context.close()


def test_page_works_behind_nginx(page: Page, server: RunningServer, tmp_path: Path) -> None:
    from .conftest import free_port
    from .nginx_runner import RunningNginx, render_site

    port = free_port()
    nginx = RunningNginx(
        render_site(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{server.port}", "127.0.0.1/32"), port
    )
    try:
        page.goto(nginx.url + "/")
        expect(page.locator("#status")).to_contain_text("Ready")
        send(page, "Say hello.")
        expect(page.locator("#log li.assistant .stats").first).to_contain_text(
            "tokens · first token", timeout=30_000
        )
    finally:
        nginx.stop()


def test_the_page_asks_for_the_key_a_node_wants_and_remembers_it(
    page: Page, start_server: Any
) -> None:
    key = "page-key-" + "p" * 16
    node = start_server(api_keys=key)
    page.goto(node.base_url + "/")
    # Asked at once: the settings open at the key field, and the status line says why.
    expect(page.locator("#status")).to_contain_text("This node needs an API key")
    expect(page.locator("#settings")).to_be_visible()
    expect(page.locator("#api-key")).to_be_focused()
    send(page, "hello")
    expect(page.locator("#log li.error").first).to_contain_text("needs an API key")
    expect(page.locator("#api-key")).to_be_focused()

    page.fill("#api-key", "wrong-key-" + "w" * 16)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#status")).to_contain_text("The API key was refused")
    send(page, "hello")
    expect(page.locator("#log li.error").nth(1)).to_contain_text("The API key was refused")

    page.fill("#api-key", key)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#status")).to_contain_text("Ready · SmolLM2-135M-Instruct.Q4_1")
    page.fill("#max-tokens", "16")
    send(page, "Say hello.")
    expect(page.locator("#log li.assistant .stats").first).to_contain_text(
        "tokens · first token", timeout=30_000
    )
    page.reload()  # remembered in this browser, like the other settings
    assert page.input_value("#api-key") == key
    expect(page.locator("#status")).to_contain_text("Ready")
    expect(page.locator("#settings")).to_be_hidden()
    shot(page, "api-key")


def test_the_page_reads_events_however_the_network_cuts_the_stream(
    page: Page, server: RunningServer
) -> None:
    page.goto(server.base_url + "/")

    @settings(max_examples=60, deadline=None)
    @given(
        texts=st.lists(st.text(max_size=20), min_size=1, max_size=5),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    )
    @example(texts=["日本", "🙂", "a\r\nb"], cuts=[2, 13, 14, 27])
    def reads_every_event(texts: list[str], cuts: list[int]) -> None:
        frames = b"".join(frame(event_json({"text": t}), "token") for t in texts)
        frames += PING
        # Cut anywhere, also inside a CRLF or a character's bytes, as TCP and proxies may.
        chunks = [list(piece) for piece in cut_at(frames, cuts)]
        events = page.evaluate(
            """async (chunks) => {
                const { serverEvents } = await import("./sse.js");
                const body = new ReadableStream({ start(controller) {
                    for (const chunk of chunks) controller.enqueue(new Uint8Array(chunk));
                    controller.close();
                } });
                const events = [];
                for await (const e of serverEvents(new Response(body))) {
                    events.push([e.event, e.data]);
                }
                return events;
            }""",
            chunks,
        )
        assert [(e, json.loads(d)) for e, d in events] == [("token", {"text": t}) for t in texts]

    reads_every_event()
