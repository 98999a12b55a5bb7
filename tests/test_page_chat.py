"""The chat page's formatted answers, kept conversations, regenerate and edit, and long chats:
Debian's Chromium driven by Playwright against the real node (see test_page.py).

Where an answer must hold given Markdown (or markup meant to attack the page) the node's reply
is replaced by a stream that carries it: the model will not write it on demand. The page code
under test is the real one either way.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Request,
    Route,
    expect,
)

from .conftest import RunningServer
from .test_page import ARTIFACTS, CHROMIUM_ARGS, browser, send

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


def test_copy_works_on_a_plain_http_origin_without_the_clipboard_api(
    browser: Browser, start_server: Any
) -> None:
    # A node reached over plain http by a name (http://IP or http://node.lan): not a secure
    # context, so navigator.clipboard does not exist and the page falls back to the copy command.
    # (127.0.0.1 and localhost count as secure: a name mapped to 127.0.0.1 does not.)
    node = start_server(allowed_hosts="plain.test")
    # A browser of its own: the name's mapping is a launch option.
    chromium = browser.browser_type.launch(
        executable_path="/usr/bin/chromium",
        args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP plain.test 127.0.0.1"],
    )
    try:
        context = chromium.new_context(viewport={"width": 1100, "height": 800})
        page = context.new_page()
        page.goto(f"http://plain.test:{node.port}/")
        expect(page.locator("body")).to_have_attribute("data-ready", "yes")
        expect(page.locator("#status")).to_contain_text("Ready")
        assert page.evaluate("[window.isSecureContext, 'clipboard' in navigator]") == [
            False,
            False,
        ]
        reply_with(page, "Run:\n\n```sh\nprintf '%s\\n' \"a <b> & c\"\n```\n")
        send(page, "a command please")
        answered(page, 1)
        copy = page.locator("#log li.assistant .copy-code")
        copy.focus()
        page.keyboard.press("Enter")  # by keyboard: focus must come back to the button
        expect(copy).to_have_text("Copied")
        expect(copy).to_be_focused()
        expect(page.locator(".clipboard-scratch")).to_have_count(0)
        assert len(stored_chats(page)) == 1  # IndexedDB works there too

        # Read the clipboard back from a secure origin of the same browser.
        context.grant_permissions(["clipboard-read"], origin=node.base_url)
        reader = context.new_page()
        reader.goto(node.base_url + "/")
        assert reader.evaluate("navigator.clipboard.readText()") == "printf '%s\\n' \"a <b> & c\""
    finally:
        chromium.close()


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
# alert(), load a URL, navigate, take focus or restyle the page if it ran or rendered.
XSS_CORPUS = [
    # script tags
    "<script>alert('script')</script>",
    "<template><script>alert('template')</script></template>",
    "<noscript><p title=\"</noscript><img src=x onerror=alert('mxss')>\">",  # mutation XSS
    # event handlers
    "<body onload=alert('body')>",
    "<input autofocus onfocus=alert('focus')>",
    "<video><source onerror=alert('video')></video>",
    '<a href="https://example.invalid/" onclick="alert(\'click\')">looks fine</a>',
    # SVG
    "<svg><a xlink:href=\"javascript:alert('svg-a')\"><text y=20>svg link</text></a></svg>",
    "<svg><animate onbegin=alert('animate') attributeName=x dur=1s></svg>",
    "<svg><use href=\"data:image/svg+xml,<svg id='x' xmlns='http://www.w3.org/2000/svg'>"
    "<image href='1' onerror='alert(1)'/></svg>#x\"/></svg>",
    "<img src=x onerror=\"alert('img')\">",
    "<svg onload=alert('svg')><circle r=5 /></svg>",
    "<svg><script>alert('svg-script')</script></svg>",
    "<math><mi xlink:href=\"javascript:alert('math')\">x</mi></math>",
    "<iframe srcdoc=\"<script>parent.alert('srcdoc')</script>\"></iframe>",
    "<iframe src=\"javascript:alert('iframe')\"></iframe>",
    "<iframe src=\"data:text/html,<script>alert('iframe-data')</script>\"></iframe>",
    "<embed src=\"javascript:alert('embed')\">",
    "<object data=\"javascript:alert('object')\"></object>",
    "<details open ontoggle=alert('details')>x</details>",
    "<a href=\"javascript:alert('a')\">a link</a>",
    "[md link](javascript:alert('md'))",
    "[spaced](  javascript:alert('spaced'))",
    "[entity](jav&#x61;script:alert('entity'))",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgnZGF0YScpPC9zY3JpcHQ+)",
    "[vb](vbscript:msgbox('vb'))",
    "[angle](<javascript:alert('angle')>)",
    "[case](JaVaScRiPt:alert('case'))",
    "[tab](java\tscript:alert('tab'))",
    "[colon](javascript&colon;alert('colon'))",
    "[![nested](https://example.invalid/i.png)](javascript:alert('nested'))",
    "[svg data](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
    "![data image](data:image/svg+xml,%3Csvg%20onload=alert('data-img')%3E)",
    "[ref data][d]\n\n[d]: data:text/html,%3Cscript%3Ealert('refdata')%3C/script%3E",
    "<https://example.invalid/\"onmouseover=\"alert('autolink-attr')>",
    "<javascript:alert('autolink')>",
    "![img](javascript:alert('image'))",
    "![tracker](http://127.0.0.1:9/pixel.png)",
    "![x](x\" onerror=\"alert('attr'))",
    "[ref link][r]\n\n[r]: javascript:alert('ref')",
    '[title](http://example.invalid/ "a\\" onmouseover=\\"alert(\'title\')")',
    "<style>body{background:url(http://127.0.0.1:9/css)}</style>",
    '<div style="background:url(http://127.0.0.1:9/inline)">styled</div>',
    "<link rel=stylesheet href=http://127.0.0.1:9/link.css>",
    "<style>@import 'http://127.0.0.1:9/import.css';</style>",
    '<div style="position:fixed;inset:0;background:red;z-index:9">an overlay</div>',
    '<p class="skip-link error visually-hidden">borrowed classes</p>',
    "<form action=javascript:alert('form')><button>go</button></form>",
    "<meta http-equiv=refresh content=\"0;url=javascript:alert('meta')\">",
    "<base href=\"javascript:alert('base')//\">",
    "```\"><img src=x onerror=alert('lang')>\ncode\n```",
    "| a | b |\n| - | - |\n| <img src=x onerror=alert('cell')> | [c](javascript:alert('cell')) |",
    "<a id=announce name=announce>clobber</a>",
    "`<img src=x onerror=alert('code')>`",
]


# Runs in the page before its own script: notes every CSP or Trusted Types refusal, and every
# navigation the page starts (the Navigation API sees a navigation before it happens).
RECORD_REFUSALS = """
    window.__refused = [];
    document.addEventListener('securitypolicyviolation',
        (e) => window.__refused.push(`${e.violatedDirective} ${e.blockedURI} ${e.sample}`));
    navigation.addEventListener('navigate',
        (e) => window.__refused.push(`navigate ${e.destination.url}`));
"""


def watch_for_attacks(page: Page, origin: str) -> list[str]:
    """Record what an attack would cause: a dialog (the corpus calls alert()), a popup, a
    navigation, a request anywhere but the node's own page files and API, a CSP or Trusted Types
    violation. Read the page's own record with `refusals(page)`."""
    seen: list[str] = []
    page.add_init_script(RECORD_REFUSALS)
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


def refusals(page: Page) -> list[str]:
    refused: list[str] = page.evaluate("window.__refused")
    return refused


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
        // In an answer: classes only of the page's code blocks and the highlighter (none of the
        // page's own to borrow), nothing that covers the page.
        for (const el of document.querySelectorAll('#log .content *')) {
            for (const name of el.classList) {
                if (!/^(hljs|code-block$|code-bar$|copy-code$)/.test(name)) bad.push(`.${name}`);
            }
            if (getComputedStyle(el).position === 'fixed') bad.push(`fixed ${el.tagName}`);
        }
        if (document.activeElement.closest('#log .content')) bad.push('focus taken');
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
                {"role": "assistant", "content": text, "stats": text},
                {"role": "notice", "content": text},
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
    assert refusals(page) == []
    assert_nothing_dangerous_in_the_log(page)
    page.reload()  # rendered again from storage
    expect(page.locator("#log li.assistant")).to_have_count(len(XSS_CORPUS))
    settle(page)

    assert seen == []
    assert refusals(page) == []
    assert_nothing_dangerous_in_the_log(page)
    assert page.locator("#announce").count() == 1  # nothing clobbered the page's own ids
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "xss-corpus.png"), full_page=True)


def test_html_reaches_the_page_only_through_dompurify_under_trusted_types(
    page: Page, server: RunningServer
) -> None:
    page.add_init_script(RECORD_REFUSALS)
    response = page.goto(server.base_url + "/")
    assert response is not None
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in response.headers["content-security-policy"].split(";")
    )
    assert policy["require-trusted-types-for"] == "'script'"
    assert policy["trusted-types"] == "dompurify"
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    reply_with(page, *[MARKDOWN[i : i + 7] for i in range(0, len(MARKDOWN), 7)])
    send(page, "show me markdown")
    answered(page, 1)
    expect(page.locator("#log .code-block .hljs-keyword").first).to_have_text("def")
    assert refusals(page) == []  # Markdown, highlighting and sanitizing all went through
    outcome = page.evaluate("""() => {
        const tried = {};
        try {
            document.getElementById('log').insertAdjacentHTML('beforeend', '<b>raw</b>');
            tried.html = 'accepted';
        } catch (error) { tried.html = error.name; }
        // DOMPurify holds the one policy name allowed; no other may be made.
        for (const name of ['dompurify', 'another']) {
            try { trustedTypes.createPolicy(name, {createHTML: (s) => s}); tried[name] = 'made'; }
            catch (error) { tried[name] = error.name; }
        }
        return tried;
    }""")
    assert outcome == {"html": "TypeError", "dompurify": "TypeError", "another": "TypeError"}
    # The recorder sees them: a refusal would not go unnoticed in the XSS test.
    page.wait_for_function("window.__refused.length >= 3")
    assert any(r.startswith("require-trusted-types-for") for r in refusals(page)), refusals(page)


def focused(page: Page) -> str:
    descriptor: str = page.evaluate("""() => {
        const el = document.activeElement;
        return el === document.body ? 'body' : el.id || el.classList[0] || el.tagName.toLowerCase();
    }""")
    return descriptor


def test_the_keyboard_alone_reaches_and_works_every_control(
    context: BrowserContext, page: Page, server: RunningServer
) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
    open_page(page, server)
    reply_with(page, SHOWCASE)
    page.keyboard.press("Tab")
    expect(page.locator(".skip-link")).to_be_focused()
    expect(page.locator(".skip-link")).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_be_focused()
    page.keyboard.type("Write a Python function that adds two numbers.")
    page.keyboard.press("Enter")
    answered(page, 1)
    expect(page.locator("#prompt")).to_be_focused()

    # From the top: every stop in reading order, each named and with a visible focus ring.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    stops: list[str] = []
    for _ in range(40):
        page.keyboard.press("Tab")
        stop = focused(page)
        if stop in stops:
            break
        if stop == "body":
            continue
        stops.append(stop)
        expect(page.locator(":focus")).to_have_accessible_name(re.compile(r"\S"))
        ring = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert ring != "none", stop
    assert stops == [
        "skip-link", "new-chat", "settings-toggle",
        "chat-search", "open-chat", "rename-chat", "delete-chat", "export-chats", "import-chats",
        "edit", "copy-code", "regenerate", "prompt", "send",
    ]  # fmt: skip

    # Each control works from the keyboard, and focus lands where the next step is.
    page.locator("#log .copy-code").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#log .copy-code")).to_have_text("Copied")
    expect(page.locator("#log .copy-code")).to_be_focused()
    page.locator("#log .edit").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#log .editor textarea")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#log .edit")).to_be_focused()  # back where the edit began
    page.locator("#log .regenerate").focus()
    page.keyboard.press("Enter")
    answered(page, 1)
    expect(page.locator("#prompt")).to_be_focused()  # the pressed button went with the answer
    page.locator("#settings-toggle").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#settings-toggle")).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("Tab")
    expect(page.locator("#chat-search")).to_be_focused()  # the settings come after the list
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # open the chat: focus goes to its message box
    expect(page.locator("#prompt")).to_be_focused()
    page.locator("#chat-list .rename-chat").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#chat-list .rename-input")).to_be_focused()
    page.keyboard.press("Control+A")
    page.keyboard.type("Sums")
    page.keyboard.press("Enter")
    expect(page.locator("#chat-list .open-chat")).to_have_text("Sums")
    expect(page.locator("#chat-list .open-chat")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("#chat-list .delete-chat")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#chat-list .delete-chat")).to_have_text("Delete?")
    page.keyboard.press("Enter")
    expect(page.locator("#chat-list li")).to_have_count(0)
    expect(page.locator("#chat-search")).to_be_focused()  # not lost with the deleted chat

    # A real answer ending does not pull focus from where the reader went meanwhile.
    page.unroute("**/generate")
    page.fill("#max-tokens", "48")  # the settings are still open
    send(page, "Tell me about the sea.")
    page.locator("#chat-search").focus()
    answered(page, 1)
    expect(page.locator("#chat-search")).to_be_focused()
    # Send pressed with the mouse hands over to the message box for the next question.
    page.fill("#prompt", "And the sky?")
    page.click("#send")
    answered(page, 2)
    expect(page.locator("#prompt")).to_be_focused()


def test_screen_readers_get_named_regions_controls_and_entries_that_say_who_speaks(
    page: Page, server: RunningServer
) -> None:
    open_page(page, server)
    expect(page.get_by_role("navigation", name="Conversations")).to_be_visible()
    expect(page.get_by_role("main")).to_be_visible()
    conversation = page.get_by_role("list", name="Conversation", exact=True)
    expect(page.locator("#status")).to_have_attribute("role", "status")
    for role, name in [
        ("textbox", "Message"),
        ("button", "Send"),
        ("button", "Stop"),
        ("searchbox", "Search chats"),
        ("button", "New chat"),
        ("button", "Export"),
        ("button", "Import"),
    ]:
        expect(page.get_by_role(role, name=name, exact=True)).to_have_count(1)  # type: ignore[arg-type]
    settings_button = page.get_by_role("button", name="Settings", exact=True)
    expect(settings_button).to_have_attribute("aria-expanded", "false")
    settings_button.click()
    expect(settings_button).to_have_attribute("aria-expanded", "true")
    expect(page.get_by_role("form", name="Settings")).to_be_visible()
    expect(page.get_by_role("textbox", name="System prompt")).to_be_visible()
    expect(page.get_by_role("slider", name=re.compile("^Temperature"))).to_be_visible()
    expect(page.get_by_role("spinbutton", name="Max tokens")).to_be_visible()
    expect(page.get_by_label("API key")).to_be_visible()
    page.fill("#max-tokens", "48")
    settings_button.click()

    # While a real answer streams its entry says it is busy (a screen reader waits for the
    # whole of it); each entry says who speaks, also when it is read out as news.
    page.evaluate("""() => {
        new MutationObserver(() => {
            const busy = document.querySelector('#log li.assistant[aria-busy="true"]');
            if (busy && busy.querySelector('.content').textContent) {
                document.documentElement.dataset.busySpeaker = busy.textContent.split(':')[0];
            }
        }).observe(document.getElementById('log'), {subtree: true, childList: true});
    }""")
    send(page, "Tell me about the sea.")
    answered(page, 1)
    expect(page.locator("html")).to_have_attribute("data-busy-speaker", "Model")
    expect(page.locator("#log [aria-busy]")).to_have_count(0)
    entries = conversation.get_by_role("listitem")
    expect(entries).to_have_text([re.compile("^You: ?Tell me"), re.compile("^Model: ?\\S")])

    reply_with(page, SHOWCASE)
    send(page, "And a function?")
    answered(page, 2)
    expect(page.get_by_role("button", name="Copy Python")).to_have_count(1)
    expect(page.get_by_role("button", name="Regenerate this answer")).to_have_count(1)
    expect(page.get_by_role("button", name="Edit this message")).to_have_count(2)
    expect(conversation.get_by_role("table")).to_have_count(1)
    title = page.locator("#chat-list .open-chat").inner_text()
    expect(page.get_by_role("button", name=f"Rename “{title}”")).to_have_count(1)
    expect(page.get_by_role("button", name=f"Delete “{title}”")).to_have_count(1)


def accessibility_tree(page: Page) -> dict[str, dict[str, Any]]:
    """Chromium's accessibility tree of the page (what a screen reader is given), by node id."""
    cdp = page.context.new_cdp_session(page)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    cdp.detach()
    return {node["nodeId"]: node for node in nodes}


def ax_properties(node: dict[str, Any]) -> dict[str, Any]:
    return {p["name"]: p["value"].get("value") for p in node.get("properties", [])}


def read_out_when_changed(tree: dict[str, dict[str, Any]], text: str) -> list[tuple[str, bool]]:
    """Each piece of text on the page containing `text`, as (the list or log it is in, whether a
    screen reader would read it out if it changed: only in a live region, polite or assertive,
    and not where it is busy)."""
    found = []
    for node in tree.values():
        if node["role"]["value"] != "StaticText" or text not in node["name"]["value"]:
            continue
        container, live, busy = "", False, False
        while node:
            properties = ax_properties(node)
            busy = busy or bool(properties.get("busy"))
            if not live and not busy:
                live = properties.get("live") in ("polite", "assertive")
            if not container and node["role"]["value"] in ("list", "log"):
                container = node.get("name", {}).get("value", "")
            node = tree.get(node.get("parentId", ""))
        found.append((container, live))
    return sorted(found)


# Put on every live region of the accessibility tree: record what is added to it, or what its
# text becomes, unless that is inside a busy element (which a screen reader waits for).
LISTEN = """function () {
    const region = this;
    window.__heard ??= [];
    new MutationObserver((records) => {
        for (const record of records) {
            const target = record.target.nodeType === Node.TEXT_NODE
                ? record.target.parentElement : record.target;
            const busy = target.closest('[aria-busy="true"]');
            if (busy && region.contains(busy)) continue;
            const texts = record.type === 'characterData'
                ? [record.target.data] : [...record.addedNodes].map((n) => n.textContent);
            for (const text of texts) if (text.trim()) window.__heard.push(text.trim());
        }
    }).observe(region, {subtree: true, childList: true, characterData: true});
}"""


def listen_to_live_regions(page: Page) -> None:
    cdp = page.context.new_cdp_session(page)
    regions = 0
    for node in cdp.send("Accessibility.getFullAXTree")["nodes"]:
        if ax_properties(node).get("live") in ("polite", "assertive"):
            element = cdp.send("DOM.resolveNode", {"backendNodeId": node["backendDOMNodeId"]})
            cdp.send(
                "Runtime.callFunctionOn",
                {"objectId": element["object"]["objectId"], "functionDeclaration": LISTEN},
            )
            regions += 1
    cdp.detach()
    assert regions > 0


def heard(page: Page) -> list[str]:
    texts: list[str] = page.evaluate("window.__heard")
    return texts


def test_screen_readers_hear_what_is_new_but_not_a_chat_drawn_again(
    page: Page, server: RunningServer
) -> None:
    # A small context, so that the second question leaves the first turn out (and says so).
    card = {"id": "small", "object": "model", "context_length": 256, "max_prompt_tokens": 255}
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": [card]}))
    open_page(page, server)
    set_options(page, max_tokens="48")
    listen_to_live_regions(page)
    first = "Tell me about oaks. " * 15
    second = "And about the birch? " * 15
    reply_with(page, "Oaks live **long**: see [the list](https://example.org/).")
    send(page, first)
    answered(page, 1)
    reply_with(page, "Birches are *pale*.")
    send(page, second)
    answered(page, 2)
    # What was new is read out: each answer once it is complete (its link as text, no buttons),
    # the note; your own messages are not read back to you.
    expect(page.locator("#log li.notice")).to_have_count(1)
    assert heard(page) == [
        "Model: Oaks live long: see the list.",
        "Note: The 2 oldest messages no longer fit in the model's context (256 tokens) and are "
        "left out of what it is sent: it does not see them.",
        "Model: Birches are pale.",
    ]
    tree = accessibility_tree(page)
    assert read_out_when_changed(tree, "Birches are") == [
        ("Conversation", False),
        ("New in the conversation", True),
    ]
    news = [n for n in tree.values() if n.get("name", {}).get("value") == "New in the conversation"]
    assert [n["role"]["value"] for n in news] == ["log"]
    assert ax_properties(news[0])["relevant"] == "additions text"

    # The chat opened again from the list is drawn whole: nothing of it is live, nothing heard.
    page.click("#new-chat")
    page.locator("#chat-list .open-chat").first.click()
    expect(page.locator("#log li")).to_have_count(5)
    tree = accessibility_tree(page)
    for text in ("Tell me about oaks.", "Oaks live", "no longer fit", "the birch?", "Birches are"):
        found = read_out_when_changed(tree, text)
        assert ("Conversation", False) in found and ("Conversation", True) not in found, text
    assert len(heard(page)) == 3

    # Regenerate and edit draw the chat again too: only their new answer is heard.
    reply_with(page, "Birches have white bark.")
    page.click("#log .regenerate")
    answered(page, 2)
    expect(page.locator("#log li.assistant").last).to_contain_text("white bark")
    reply_with(page, "Elms are tall.")
    page.locator("#log li.user").first.locator(".edit").click()
    page.locator("#log .editor textarea").fill("Tell me about elms.")
    page.keyboard.press("Enter")
    answered(page, 1)
    assert heard(page)[3:] == ["Model: Birches have white bark.", "Model: Elms are tall."]
    for text in ("Tell me about elms.", "Elms are tall."):
        assert ("Conversation", False) in read_out_when_changed(accessibility_tree(page), text)


def test_the_status_line_is_read_out_only_when_it_changes(
    page: Page, server: RunningServer
) -> None:
    page.clock.install()  # the page checks the node every 10 s: the test moves the clock
    page.goto(server.base_url + "/")
    expect(page.locator("#status")).to_contain_text("Ready")
    page.evaluate("""() => {
        window.__statusChanges = 0;
        new MutationObserver(() => window.__statusChanges++).observe(
            document.getElementById('status'),
            {subtree: true, childList: true, characterData: true});
    }""")
    for _ in range(2):
        with page.expect_response("**/health/ready"):
            page.clock.run_for(10_000)
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 0))")
    assert page.evaluate("window.__statusChanges") == 0
    page.route(
        "**/health/ready",
        lambda route: route.fulfill(status=503, json={"status": "not ready", "reason": "loading"}),
    )
    page.clock.run_for(10_000)
    expect(page.locator("#status")).to_have_text("Not ready: loading")
    assert page.evaluate("window.__statusChanges") == 1


def test_on_a_phone_a_long_answer_ends_above_the_message_box(
    browser: Browser, server: RunningServer
) -> None:
    context = browser.new_context(
        viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True
    )
    try:
        page = context.new_page()
        open_page(page, server)
        long = "".join(f"{i}. line {i} of a long answer\n" for i in range(1, 61))
        reply_with(page, *[long[i : i + 50] for i in range(0, len(long), 50)])
        send(page, "Count to sixty.")
        answered(page, 1)
        # The end of the answer, its numbers and buttons, is on the screen, not under the box.
        answer = page.locator("#log li.assistant").bounding_box()
        box = page.locator("#ask").bounding_box()
        assert answer is not None and box is not None
        assert box["y"] + box["height"] <= 667
        assert answer["y"] + answer["height"] <= box["y"] + 1
        expect(page.locator("#log li.assistant .regenerate")).to_be_in_viewport()
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # The chat list opens from its button; a chat picked there closes it.
        page.click("#chats-toggle")
        expect(page.locator("#chat-search")).to_be_focused()
        expect(page.locator("#chats-toggle")).to_have_attribute("aria-expanded", "true")
        page.locator("#chat-list .open-chat").click()
        expect(page.locator("#chats")).to_be_hidden()
        expect(page.locator("#chats-toggle")).to_have_attribute("aria-expanded", "false")
    finally:
        context.close()


def test_the_page_works_under_a_path_prefix_with_relative_urls(
    page: Page, server: RunningServer
) -> None:
    # As a proxy might publish it at /llm/: every request the page makes must stay under it.
    prefix = server.base_url + "/llm/"
    outside: list[str] = []

    def proxy(route: Route) -> None:
        url = route.request.url
        if not url.startswith(prefix):
            outside.append(url)
            route.abort()
            return
        route.fulfill(response=route.fetch(url=server.base_url + "/" + url.removeprefix(prefix)))

    page.route("**/*", proxy)
    page.goto(prefix)
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    expect(page.locator("#status")).to_contain_text("Ready")
    set_options(page, max_tokens="16")
    send(page, "Say hello.")
    answered(page, 1)
    expect(page.locator("#log li.assistant .content")).not_to_be_empty()
    assert outside == []


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
            # The page's text and its code blocks follow the system's scheme.
            text, code = (
                sum(int(v) for v in re.findall(r"\d+", colour)[:3]) / 3
                for colour in page.evaluate("""() => [
                    getComputedStyle(document.body).color,
                    getComputedStyle(document.querySelector('#log code.hljs')).backgroundColor,
                ]""")
            )
            assert (text < 60 and code > 200) if scheme == "light" else (text > 200 and code < 60)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"chat-{name}-{scheme}.png"))
            if phone:
                page.click("#chats-toggle")
                expect(page.locator("#chat-list .open-chat")).to_have_count(1)
                assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        finally:
            context.close()
