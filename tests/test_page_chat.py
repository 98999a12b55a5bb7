"""The chat page's formatted answers, kept conversations, regenerate and edit, and long chats:
Debian's Chromium driven by Playwright against the real node (see test_page.py).

Where an answer must hold given Markdown (or markup meant to attack the page) the node's reply
is replaced by a stream that carries it: the model will not write it on demand. The page code
under test is the real one either way.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Request, expect

from .conftest import RunningServer
from .test_page import ARTIFACTS, browser, send

__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with test_page

ROOT = Path(__file__).resolve().parents[1]
ANSWER = 60_000  # ms a real answer may take on a busy 2-core machine


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def open_page(page: Page, node: RunningServer) -> None:
    page.goto(node.base_url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    expect(page.locator("#status")).to_contain_text("Ready")


def set_options(page: Page, *, temperature: str = "0", max_tokens: str = "48") -> None:
    page.click("#settings-toggle")
    page.locator("#temperature").fill(temperature)
    page.fill("#max-tokens", max_tokens)
    page.click("#settings-toggle")


def answered(page: Page, count: int) -> None:
    """Wait until the page shows `count` finished answers (failing at once on an error)."""
    done = page.locator("#log li.assistant .stats, #log li.error")
    expect(done).to_have_count(count, timeout=ANSWER)
    errors = page.locator("#log li.error").all_inner_texts()
    assert errors == [], errors


def sse(*texts: str) -> str:
    frames = [f"event: token\ndata: {json.dumps({'text': t})}\n\n" for t in texts]
    frames.append(
        'event: done\ndata: {"finish_reason": "stop", "prompt_tokens": 20, '
        '"completion_tokens": 9, "time_to_first_token": 0.1, "tokens_per_second": 10}\n\n'
    )
    return "".join(frames)


def reply_with(page: Page, *texts: str) -> None:
    page.route(
        "**/generate",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse(*texts)),
    )


def sent_bodies(page: Page) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []

    def record(request: Request) -> None:
        if request.url.endswith("/generate") and request.method == "POST":
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", record)
    return bodies


def stored_chats(page: Page) -> list[dict[str, Any]]:
    chats: list[dict[str, Any]] = page.evaluate(
        "async () => (await import('./store.js')).listChats()"
    )
    return chats


MARKDOWN = (
    "Here is **bold**, *emphasis* and `inline code`.\n\n"
    "- one\n- two\n\n"
    "| fruit | colour |\n| --- | --- |\n| apple | red |\n| lime | green |\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n"
)


def test_markdown_tables_and_code_render_with_highlighting(
    page: Page, server: RunningServer
) -> None:
    open_page(page, server)
    reply_with(page, *[MARKDOWN[i : i + 7] for i in range(0, len(MARKDOWN), 7)])
    send(page, "show me markdown")
    answer = page.locator("#log li.assistant").first
    expect(answer.locator(".stats")).to_be_visible()
    expect(answer.locator(".content strong")).to_have_text("bold")
    expect(answer.locator(".content em")).to_have_text("emphasis")
    expect(answer.locator(".content ul li")).to_have_count(2)
    expect(answer.locator(".content table tbody tr")).to_have_count(2)
    expect(answer.locator(".content table th").first).to_have_text("fruit")
    code = answer.locator(".code-block code")
    expect(code).to_have_text("def add(a, b):\n    return a + b")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")  # highlighted
    expect(answer.locator(".code-bar")).to_contain_text("Python")
    assert "**" not in answer.inner_text() and "```" not in answer.inner_text()


def test_a_streamed_answer_shows_its_code_block_before_it_ends(
    page: Page, server: RunningServer
) -> None:
    open_page(page, server)
    set_options(page, max_tokens="160")
    # Note, while the answer still streams, whether a code block was already on the page.
    page.evaluate("""() => {
        new MutationObserver(() => {
            if (document.querySelector('#log li.assistant[aria-busy="true"] .code-block code')) {
                document.documentElement.dataset.codeWhileStreaming = 'yes';
            }
        }).observe(document.getElementById('log'), {subtree: true, childList: true});
    }""")
    send(page, "Write a Python function that adds two numbers. Use a code block.")
    answered(page, 1)
    expect(page.locator("html")).to_have_attribute("data-code-while-streaming", "yes")
    code = page.locator("#log li.assistant .code-block code").first
    expect(code).to_contain_text("def ")
    assert "```" not in page.locator("#log li.assistant").first.inner_text()


def test_copy_puts_the_code_on_the_clipboard(
    context: BrowserContext, page: Page, server: RunningServer
) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
    open_page(page, server)
    reply_with(page, "Run this:\n\n```sh\necho 'hello <world>' && ls -la\n```\n\nand then:\n")
    send(page, "a command please")
    copy = page.locator("#log li.assistant .copy-code")
    copy.click()
    expect(copy).to_have_text("Copied")
    expect(page.locator("#announce")).to_have_text("Code copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == "echo 'hello <world>' && ls -la"


def test_a_conversation_survives_a_reload_and_is_listed(page: Page, server: RunningServer) -> None:
    open_page(page, server)
    set_options(page, max_tokens="16")
    send(page, "Name a colour.")
    answered(page, 1)
    first_answer = page.locator("#log li.assistant .content").first.inner_text()
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    expect(page.locator("#log li.user .content")).to_have_text(["Name a colour."])
    expect(page.locator("#log li.assistant .content")).to_have_text([first_answer])
    expect(page.locator("#log li.assistant .stats")).to_contain_text("tokens")
    expect(page.locator("#chat-list .open-chat")).to_have_text(["Name a colour."])

    # A second chat; both listed, newest first; search finds by title or text.
    page.click("#new-chat")
    expect(page.locator("#log li")).to_have_count(0)
    send(page, "Name an animal.")
    answered(page, 1)
    titles = page.locator("#chat-list .open-chat")
    expect(titles).to_have_text(["Name an animal.", "Name a colour."])
    page.fill("#chat-search", "colour")
    expect(titles).to_have_text(["Name a colour."])
    page.fill("#chat-search", "")

    # Open the first again, rename it, delete the other.
    page.locator("#chat-list .open-chat", has_text="Name a colour.").click()
    expect(page.locator("#log li.user .content")).to_have_text(["Name a colour."])
    page.locator("#chat-list li", has_text="Name a colour.").locator(".rename-chat").click()
    page.fill("#chat-list .rename-input", "Colours")
    page.keyboard.press("Enter")
    expect(titles).to_have_text(["Name an animal.", "Colours"])
    delete = page.locator("#chat-list li", has_text="Name an animal.").locator(".delete-chat")
    delete.click()
    expect(delete).to_have_text("Delete?")
    delete.click()
    expect(titles).to_have_text(["Colours"])
    page.reload()
    expect(page.locator("#chat-list .open-chat")).to_have_text(["Colours"])
    expect(page.locator("#log li.user .content")).to_have_text(["Name a colour."])


def test_export_then_import_gives_the_same_chat(
    browser: Browser, page: Page, server: RunningServer, tmp_path: Path
) -> None:
    open_page(page, server)
    set_options(page, max_tokens="16")
    send(page, "Say hello.")
    answered(page, 1)
    send(page, "Say goodbye.")
    answered(page, 2)
    with page.expect_download() as download:
        page.click("#export-chats")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    original = stored_chats(page)
    assert len(original) == 1 and len(original[0]["messages"]) == 4

    elsewhere = browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        other = elsewhere.new_page()
        open_page(other, server)
        expect(other.locator("#chat-list-empty")).to_be_visible()
        other.set_input_files("#import-file", str(exported))
        expect(other.locator("#chat-files-note")).to_have_text("Imported 1 chat.")
        other.locator("#chat-list .open-chat").click()
        expect(other.locator("#log li.user .content")).to_have_text(["Say hello.", "Say goodbye."])
        imported = stored_chats(other)
        keys = ("id", "title", "created", "messages")
        assert [{k: c[k] for k in keys} for c in imported] == [
            {k: c[k] for k in keys} for c in original
        ]
        # Imported twice: the same chat is not added again.
        other.set_input_files("#import-file", str(exported))
        expect(other.locator("#chat-files-note")).to_have_text("Imported 0 chats.")
        # A file the page did not write is refused whole, and says so.
        foreign = tmp_path / "foreign.json"
        foreign.write_text(json.dumps({"chats": [{"messages": [{"role": "system"}]}]}))
        other.set_input_files("#import-file", str(foreign))
        expect(other.locator("#chat-files-note")).to_contain_text("could not be imported")
        expect(other.locator("#chat-list .open-chat")).to_have_count(1)
    finally:
        elsewhere.close()


def test_regenerate_and_edit(page: Page, server: RunningServer) -> None:
    open_page(page, server)
    set_options(page, temperature="1.0", max_tokens="16")
    bodies = sent_bodies(page)
    send(page, "Name a fruit.")
    answered(page, 1)
    send(page, "Name a vegetable.")
    answered(page, 2)

    page.click("#log li.assistant >> nth=1 >> .regenerate")
    answered(page, 2)  # the last answer replaced, not added to
    expect(page.locator("#log li.user .content")).to_have_text(
        ["Name a fruit.", "Name a vegetable."]
    )
    assert bodies[2]["messages"] == bodies[1]["messages"]  # the same question asked again
    expect(page.locator("#log .regenerate")).to_have_count(1)  # only on the last answer

    page.locator("#log li.user").first.locator(".edit").click()
    editor = page.locator("#log .editor textarea")
    expect(editor).to_be_focused()
    editor.fill("Name a tree.")
    page.keyboard.press("Enter")
    answered(page, 1)  # the conversation continues from the edited message
    expect(page.locator("#log li.user .content")).to_have_text(["Name a tree."])
    assert bodies[3]["messages"] == [{"role": "user", "content": "Name a tree."}]
    assert set(bodies[3]) == {"messages", "temperature", "max_tokens"}
    chat = stored_chats(page)[0]
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][0]["content"] == "Name a tree."


def test_a_chat_past_the_context_keeps_answering_and_says_so(page: Page, start_server: Any) -> None:
    node = start_server(n_ctx=512, n_slots=1)
    open_page(page, node)
    page.click("#settings-toggle")
    page.fill("#system-prompt", "You are brief. Remember: the password is swordfish.")
    page.locator("#temperature").fill("0")
    page.fill("#max-tokens", "40")
    page.click("#settings-toggle")
    bodies = sent_bodies(page)
    questions = [f"Question {i}: tell me one fact about the number {i}." for i in range(1, 10)]
    for i, question in enumerate(questions, start=1):
        send(page, question)
        answered(page, i)
    expect(page.locator("#log li.error")).to_have_count(0)
    notices = page.locator("#log li.notice")
    expect(notices.first).to_contain_text("no longer fit in the model's context (512 tokens)")
    last = bodies[-1]["messages"]
    assert last[0]["role"] == "system"
    assert last[0]["content"].startswith("You are brief.")  # the system prompt is never dropped
    assert last[-1] == {"role": "user", "content": questions[-1]}
    assert len(last) - 1 < 2 * len(questions) - 1  # older turns were left out
    assert last[1]["role"] == "user"  # whole turns go
    # Every message is still on screen and kept; only the requests leave the old ones out.
    expect(page.locator("#log li.user")).to_have_count(len(questions))

    # A single message larger than the whole context: the node's 400 is shown plainly.
    send(page, "word " * 700)
    expect(page.locator("#log li.error")).to_contain_text(
        "The request was refused: the prompt has", timeout=ANSWER
    )


def test_the_window_of_a_long_chat_moves_seldom_and_by_whole_turns(
    page: Page, server: RunningServer
) -> None:
    open_page(page, server)
    # Twenty turns of 20 + 20 tokens against 512 of context, 40 for the answer: each new
    # question either keeps the last request's start (the node reuses its cache) or moves it to
    # three quarters of the budget; the window always starts with a question.
    starts = page.evaluate("""async () => {
        const { fitToContext, promptBudget } = await import('./context.js');
        const limits = {context_length: 512, max_prompt_tokens: 511};
        const messages = [];
        const starts = [];
        let kept = 0;
        for (let i = 0; i < 20; i++) {
            messages.push({role: 'user', content: 'q', tokens: 20});
            const { send, dropped } = fitToContext(
                {system: 'be brief', messages, limits, maxTokens: 40, base: 10, kept});
            const size = 10 + 9 + send.reduce((sum, m) => sum + m.tokens, 0);
            if (size > promptBudget(limits, 40) || send[0].role !== 'user') return 'bad';
            starts.push(dropped);
            kept = dropped;
            messages.push({role: 'assistant', content: 'a', tokens: 20});
        }
        return starts;
    }""")
    assert starts != "bad"
    moves = [b for a, b in itertools.pairwise(starts) if a != b]
    assert starts[0] == 0 and starts[-1] > 0
    assert len(moves) <= len(starts) // 3  # a move frees room for several turns
    assert all(start % 2 == 0 for start in starts)


# Markup meant to attack the page, as an answer's Markdown might carry it. Each would call
# alert() or load a URL if it ran or rendered.
XSS_CORPUS = [
    "<script>alert('script')</script>",
    "<img src=x onerror=\"alert('img')\">",
    "<svg onload=alert('svg')><circle r=5 /></svg>",
    "<svg><script>alert('svg-script')</script></svg>",
    "<math><mi xlink:href=\"javascript:alert('math')\">x</mi></math>",
    "<iframe srcdoc=\"<script>parent.alert('srcdoc')</script>\"></iframe>",
    "<iframe src=\"javascript:alert('iframe')\"></iframe>",
    "<object data=\"javascript:alert('object')\"></object>",
    "<details open ontoggle=alert('details')>x</details>",
    "<a href=\"javascript:alert('a')\">a link</a>",
    "[md link](javascript:alert('md'))",
    "[spaced](  javascript:alert('spaced'))",
    "[entity](jav&#x61;script:alert('entity'))",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgnZGF0YScpPC9zY3JpcHQ+)",
    "[vb](vbscript:msgbox('vb'))",
    "<javascript:alert('autolink')>",
    "![img](javascript:alert('image'))",
    "![tracker](http://127.0.0.1:9/pixel.png)",
    "![x](x\" onerror=\"alert('attr'))",
    "[ref link][r]\n\n[r]: javascript:alert('ref')",
    '[title](http://example.invalid/ "a\\" onmouseover=\\"alert(\'title\')")',
    "<style>body{background:url(http://127.0.0.1:9/css)}</style>",
    '<div style="background:url(http://127.0.0.1:9/inline)">styled</div>',
    "<link rel=stylesheet href=http://127.0.0.1:9/link.css>",
    "<form action=javascript:alert('form')><button>go</button></form>",
    "<meta http-equiv=refresh content=\"0;url=javascript:alert('meta')\">",
    "<base href=\"javascript:alert('base')//\">",
    "```\"><img src=x onerror=alert('lang')>\ncode\n```",
    "| a | b |\n| - | - |\n| <img src=x onerror=alert('cell')> | [c](javascript:alert('cell')) |",
    "<a id=announce name=announce>clobber</a>",
    "`<img src=x onerror=alert('code')>`",
]


def watch_for_attacks(page: Page, origin: str) -> list[str]:
    """Record what an attack would cause: a dialog, a popup, a navigation, a request anywhere
    but the node's own page files and API, a CSP violation."""
    seen: list[str] = []
    allowed = {
        "/", "/app.js", "/sse.js", "/markdown.js", "/store.js", "/context.js", "/style.css",
        "/health/ready", "/v1/models", "/generate", "/favicon.ico",
        "/x",  # settle()'s control image
    }  # fmt: skip

    def on_request(request: Request) -> None:
        path = request.url.removeprefix(origin)
        if request.url.startswith(origin) and (path in allowed or path.startswith("/vendor/")):
            return
        seen.append(f"request {request.url}")

    page.on("dialog", lambda dialog: (seen.append(f"dialog {dialog.message}"), dialog.dismiss()))
    page.on("popup", lambda popup: seen.append(f"popup {popup.url}"))
    page.on(
        "framenavigated",
        lambda frame: (
            seen.append(f"navigated {frame.url}") if frame.url.rstrip("/") != origin else None
        ),
    )
    page.on("request", on_request)
    page.on(
        "console",
        lambda message: (
            seen.append(f"console {message.text}")
            if "Content Security Policy" in message.text
            else None
        ),
    )
    return seen


def settle(page: Page) -> None:
    """Any image the markup made would have failed to load by the time one of ours has (its
    onerror then run): wait for a control image with the same kind of src (see test_page)."""
    page.evaluate("""() => {
        const control = new Image();
        control.onerror = () => { document.documentElement.dataset.controlFailed = 'yes'; };
        control.src = 'x';
    }""")
    expect(page.locator("html")).to_have_attribute("data-control-failed", "yes")


def assert_nothing_dangerous_in_the_log(page: Page) -> None:
    found = page.evaluate("""() => {
        const bad = [];
        for (const el of document.querySelectorAll('#log *')) {
            const tag = el.tagName.toLowerCase();
            if (['script', 'img', 'svg', 'math', 'iframe', 'object', 'embed', 'style', 'link',
                 'meta', 'base', 'form', 'details'].includes(tag)) bad.push(tag);
            for (const attr of el.attributes) {
                const name = attr.name;
                if (name.startsWith('on') || ['style', 'id', 'name', 'srcdoc'].includes(name)) {
                    bad.push(`${tag}[${name}]`);
                }
            }
            const href = el.getAttribute('href');
            if (href !== null && !/^(https?:|mailto:)/i.test(href)) bad.push(`${tag} href=${href}`);
        }
        return bad;
    }""")
    assert found == []


def test_an_xss_corpus_in_answers_and_imported_chats_runs_nothing(
    page: Page, server: RunningServer, tmp_path: Path
) -> None:
    seen = watch_for_attacks(page, server.base_url)
    open_page(page, server)
    corpus = "\n\n".join(XSS_CORPUS)
    # Streamed in small pieces: every partial parse is rendered too.
    reply_with(page, *[corpus[i : i + 40] for i in range(0, len(corpus), 40)])
    send(page, "attack me")
    answered(page, 1)
    expect(page.locator("#log li.assistant .content")).to_contain_text("a link")
    settle(page)

    # The same corpus as a kept chat from a file: its answers, messages and title.
    chat = {
        "id": "<img src=x onerror=alert('id')>",
        "title": "<img src=x onerror=alert('title')>",
        "messages": [
            item
            for text in XSS_CORPUS
            for item in (
                {"role": "user", "content": text},
                {"role": "assistant", "content": text},
            )
        ],
    }
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps({"chats": [chat]}))
    page.set_input_files("#import-file", str(hostile))
    expect(page.locator("#chat-files-note")).to_have_text("Imported 1 chat.")
    page.locator("#chat-list .open-chat", has_text="<img").click()
    expect(page.locator("#log li.assistant")).to_have_count(len(XSS_CORPUS))
    settle(page)
    page.reload()  # rendered again from storage
    expect(page.locator("#log li.assistant")).to_have_count(len(XSS_CORPUS))
    settle(page)

    assert seen == []
    assert_nothing_dangerous_in_the_log(page)
    assert page.locator("#announce").count() == 1  # nothing clobbered the page's own ids
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "xss-corpus.png"), full_page=True)


def test_vendored_libraries_match_their_recorded_checksums() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "vendor_static.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((ROOT / "static" / "vendor" / "manifest.json").read_text())
    for package in manifest["packages"]:
        assert package["license"] and package["integrity"].startswith("sha512-")


SHOWCASE = (
    "Here is a function that adds two numbers:\n\n"
    "```python\ndef add(a: int, b: int) -> int:\n"
    '    """Return the sum."""\n    return a + b\n```\n\n'
    "| call | result |\n| --- | --- |\n| `add(2, 3)` | 5 |\n| `add(-1, 1)` | 0 |\n\n"
    "It works for **any** integers."
)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots_in_light_and_dark_on_a_desktop_and_a_phone(
    browser: Browser, server: RunningServer, scheme: str
) -> None:
    """The pictures in docs/chat-page.md come from here (test-artifacts/chat-*.png)."""
    sizes = {"desktop": {"width": 1100, "height": 760}, "phone": {"width": 375, "height": 740}}
    for name, viewport in sizes.items():
        phone = name == "phone"
        context = browser.new_context(
            viewport=viewport, color_scheme=scheme, is_mobile=phone, has_touch=phone
        )
        try:
            page = context.new_page()
            open_page(page, server)
            reply_with(page, SHOWCASE)
            send(page, "Write a Python function that adds two numbers.")
            answered(page, 1)
            page.locator("#prompt").blur()
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"chat-{name}-{scheme}.png"))
            if phone:
                page.click("#chats-toggle")
                expect(page.locator("#chat-list .open-chat")).to_have_count(1)
                assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        finally:
            context.close()
