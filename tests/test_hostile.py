"""A corpus of hostile requests sent to one running node while ordinary streams run on it.

Afterwards the node must be live and ready, every ordinary stream must have ended with its
`done` event, the process must have grown by less than 50 MB, and the event loop must never have
been held for more than 100 ms (the node's own lag histogram in /metrics says so).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer
from tests.sse import events

CHAT = [{"role": "user", "content": "Tell me about the sea in three sentences."}]
LAG_BUCKET = 'gguf_appliance_event_loop_lag_seconds_bucket{le="0.1"}'
LAG_COUNT = "gguf_appliance_event_loop_lag_seconds_count"
RSS = "process_resident_memory_bytes"


def held_over_100ms(node: RunningServer) -> float:
    """Times the event loop woke more than 100 ms late, from one scrape of /metrics."""
    samples = {}
    for line in httpx.get(node.url("/metrics"), timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        samples[name] = value
    return float(samples[LAG_COUNT]) - float(samples[LAG_BUCKET])


@dataclass
class Traffic:
    """Ordinary users: greedy streamed chats, one after another, on two connections."""

    node: RunningServer
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def user(self) -> None:
        body = {"messages": CHAT, "max_tokens": 48, "temperature": 0}
        for _ in range(200):  # bounded; normally stopped long before
            if self.stop.is_set():
                return
            try:
                with httpx.stream(
                    "POST", self.node.url("/generate"), json=body, timeout=120
                ) as response:
                    last = "no event"
                    text = ""
                    for name, data in events(response):
                        last = name
                        if name == "token":
                            text += data["text"]
                        if name == "done":
                            last = f"done:{data['finish_reason']}:{bool(text)}"
                    self.outcomes.append(last)
            except httpx.HTTPError as exc:
                self.outcomes.append(f"transport error: {exc!r}")

    def __enter__(self) -> Traffic:
        for _ in range(2):
            thread = threading.Thread(target=self.user)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)


@dataclass
class Scene:
    node: RunningServer
    rss_before: float
    lag_before: float
    traffic: Traffic


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    node = RunningServer({"GGUF_APPLIANCE_N_SLOTS": "4"}, log)
    try:
        node.wait_ready()
        # Warm up the paths the corpus takes (a grammar built, an answer streamed) before the
        # memory baseline, so it is not the first allocations that are measured.
        warm = {"messages": CHAT, "max_tokens": 8, "grammar": 'root ::= "yes" | "no"'}
        assert httpx.post(node.url("/v1/chat/completions"), json=warm, timeout=60).is_success
        with Traffic(node) as traffic:
            yield Scene(node, node.metric(RSS), held_over_100ms(node), traffic)
    finally:
        node.stop()


def post(node: RunningServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(node.url(path), json=body, timeout=60, **kwargs)


def grammar_body(grammar: str) -> dict[str, Any]:
    return {"prompt": "hi", "temperature": 0, "max_tokens": 4, "grammar": grammar}


def schema_body(schema: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }


HOSTILE_GRAMMARS = {
    # The request that used to end the process in GGML_ABORT.
    "a NUL character only": ('root ::= "\\x00"', "allows no token"),
    "40,000 nested groups": ("root ::= " + "(" * 40_000 + '"a"' + ")" * 40_000, "nests"),
    "a 40 kB literal 2,000 times": ('root ::= "' + "a" * 40_000 + '"{2000}', "expands"),
    "5,000 alternatives": ("root ::= " + " | ".join(f'"w{i}"' for i in range(5000)), "alter"),
    "left recursion": ('root ::= root "a" | "a"', "left-recursive"),
    "a text token that is two": ("root ::= <hello world>", "not one token"),
    "an undefined rule": ('root ::= "a" b', "undefined rule"),
    "a lone surrogate": ('root ::= "\ud800"', "unicode"),
    "nested repetitions": ('root ::= (("a"{0,60}){0,60})', "repeats too many"),
    # llama.cpp would count 2**64 - 1 optional copies (an unsigned high - low).
    "a maximum below the minimum": ('root ::= "a"{1,0}', "at least 1 and at most 0"),
    "a 30-digit repetition": ('root ::= "a"{0,' + "9" * 30 + "}", "too big a number"),
    # llama.cpp's left-recursion check is exponential in such chains: its worker is stopped.
    "2**40 ways to start": (
        "root ::= a1 | a1\n"
        + "\n".join(f"a{i} ::= a{i + 1} | a{i + 1}" for i in range(1, 40))
        + '\na40 ::= "x"',
        "took more than",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GRAMMARS))
@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_hostile_grammar_gets_400_naming_the_field(scene: Scene, case: str, path: str) -> None:
    grammar, said = HOSTILE_GRAMMARS[case]
    body = json.dumps(grammar_body(grammar)).encode()  # json.dumps keeps a lone surrogate
    response = httpx.post(
        scene.node.url(path),
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "grammar"
    assert said in error["message"]


TROUBLE_FOR_LLAMA_CPP = {
    # 4,000 alternatives: masking the vocabulary takes about a second of CPU. A greedy answer
    # rarely needs the whole mask (its 512 likeliest tokens are tried first); a sampled one
    # ends with a 400 (or an error event) as soon as one mask costs more than 250 ms.
    "4,000 alternatives": "root ::= " + " | ".join(f'"w{i}x"' for i in range(4000)),
    # A token element after a character: llama.cpp's accept throws (an abort) when the first
    # token has two letters or more; only the grammar's worker process goes.
    "a token after a character": "root ::= [a-z] !<[0]>",
    # Each "a" doubles the parse stacks; a token of several a's multiplies them at once.
    "stacks that double": 'root ::= x\nx ::= "a" x "b" | "a" x "c" | "."',
}


@pytest.mark.parametrize("case", sorted(TROUBLE_FOR_LLAMA_CPP))
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_grammar_llama_cpp_cannot_handle_ends_its_own_request_only(
    scene: Scene, case: str, temperature: float
) -> None:
    for prompt in ("the", "a" * 64):
        body = grammar_body(TROUBLE_FOR_LLAMA_CPP[case])
        body.update(prompt=prompt, temperature=temperature, max_tokens=32)
        answered_or_refused(post(scene.node, "/v1/completions", body), "grammar")


def test_a_vanishing_temperature_under_a_grammar_stays_in_it(scene: Scene) -> None:
    # Logits divided by 1e-39 overflow; llama.cpp's dist sampler then picks the last
    # candidate, which may be one the grammar forbids.
    body = {
        "prompt": "Is the sky blue?",
        "temperature": 1e-39,
        "top_p": 1,
        "min_p": 0,
        "max_tokens": 8,
        "grammar": 'root ::= "true" | "false"',
    }
    response = post(scene.node, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] in ("true", "false")


def test_an_integer_of_5000_digits_gets_400(scene: Scene) -> None:
    body = b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    response = httpx.post(
        scene.node.url("/generate"),
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400


def test_a_grammar_that_runs_dry_mid_answer_ends_that_stream_with_an_error(scene: Scene) -> None:
    # "a" is allowed, then nothing is: the stream has begun (200), so the error is an event.
    body = grammar_body('root ::= "a" "\\x00"')
    with httpx.stream("POST", scene.node.url("/generate"), json=body, timeout=60) as response:
        assert response.status_code == 200
        seen = list(events(response))
    assert seen[-1][0] == "error"
    assert seen[-1][1]["status"] == 400
    assert "allows no token" in seen[-1][1]["message"]
    unstreamed = post(scene.node, "/v1/completions", body)
    assert unstreamed.status_code == 400
    assert unstreamed.json()["error"]["param"] == "grammar"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^a{300000000}$"},
        {"type": "string", "pattern": "((ab){500}){500}"},
        {"type": "string", "pattern": "a" * 5000},
        {"type": "string", "minLength": 10**8},
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(30_000)}},
        {
            "$defs": {
                **{
                    f"a{i}": {
                        "anyOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]
                    }
                    for i in range(40)
                },
                "a40": {"type": "boolean"},
            },
            "anyOf": [{"$ref": "#/$defs/a0"}],
        },
    ],
    ids=[
        "pattern-repeat",
        "pattern-nested",
        "pattern-long",
        "minLength",
        "30k-properties",
        "2**40-ways",
    ],
)
def test_a_hostile_schema_gets_400_naming_response_format(scene: Scene, schema: Any) -> None:
    response = post(scene.node, "/v1/chat/completions", schema_body(schema))
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == "response_format"


def test_a_body_that_is_not_json_gets_415(scene: Scene) -> None:
    # A page on another site can send text/plain or a form without a CORS preflight.
    response = httpx.post(
        scene.node.url("/generate"),
        content=b'{"prompt": "hi"}',
        headers={"content-type": "text/plain"},
        timeout=30,
    )
    assert response.status_code == 415
    assert response.json()["error"]["param"] == "Content-Type"


_ITEMS = st.sampled_from(['"a"', '"\\x00"', "[a-z]", "[^a]", ".", "x", "<[2]>", '""', "[]"])
_OPS = st.sampled_from(["", "*", "+", "?", "{2}", "{0,5}", "{3,}", "{2000}", "{1999,2000}"])


@st.composite
def grammars(draw: st.DrawFn) -> str:
    def sequence(depth: int) -> str:
        parts = []
        for _ in range(draw(st.integers(1, 4))):
            if depth < 4 and draw(st.booleans()):
                alts = [sequence(depth + 1) for _ in range(draw(st.integers(1, 3)))]
                parts.append("(" + " | ".join(alts) + ")")
            else:
                parts.append(draw(_ITEMS))
            parts.append(draw(_OPS))
        return " ".join(parts)

    rules = [f"root ::= {sequence(0)}"]
    if draw(st.booleans()):
        rules.append(f"x ::= {sequence(0)} | x")
    return "\n".join(rules)


_JSON_LEAVES = st.one_of(
    st.just({"type": "string"}),
    st.just({"type": "integer", "minimum": 3, "maximum": 2}),
    st.builds(lambda n: {"type": "string", "minLength": n}, st.integers(0, 10**9)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 3000)),
    st.builds(
        lambda p: {"type": "string", "pattern": p}, st.text("a(){},0123456789|*+?", max_size=40)
    ),
    st.builds(lambda v: {"enum": v}, st.lists(st.text(max_size=8), max_size=50)),
    st.builds(lambda r: {"$ref": r}, st.sampled_from(["#", "#/nope", "https://example.com/s"])),
)
schemas = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.one_of(
        st.builds(
            lambda i, n: {"type": "array", "items": i, "minItems": n}, inner, st.integers(0, 99)
        ),
        st.builds(
            lambda props: {"type": "object", "properties": props, "required": list(props)[:1]},
            st.dictionaries(st.text(max_size=6), inner, max_size=5),
        ),
        st.builds(lambda items: {"anyOf": items}, st.lists(inner, min_size=1, max_size=4)),
    ),
    max_leaves=12,
)

_FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def answered_or_refused(response: httpx.Response, param: str) -> None:
    if response.status_code == 200:
        return
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == param


@_FUZZ
@given(grammar=grammars())
def test_generated_grammars_are_answered_or_refused(scene: Scene, grammar: str) -> None:
    answered_or_refused(post(scene.node, "/v1/completions", grammar_body(grammar)), "grammar")


@_FUZZ
@given(schema=schemas)
def test_generated_schemas_are_answered_or_refused(scene: Scene, schema: Any) -> None:
    answered_or_refused(
        post(scene.node, "/v1/chat/completions", schema_body(schema)), "response_format"
    )


def test_afterwards_the_node_is_whole(scene: Scene) -> None:
    """Last in the file: the checks over everything the corpus did."""
    node = scene.node
    scene.traffic.__exit__()
    outcomes = scene.traffic.outcomes
    assert len(outcomes) >= 4, outcomes
    assert all(o.startswith("done:") and o.endswith(":True") for o in outcomes), outcomes
    assert httpx.get(node.url("/health/ready"), timeout=10).status_code == 200
    grown = node.metric(RSS) - scene.rss_before
    assert grown < 50 * 2**20, f"the node grew by {grown / 2**20:.0f} MB"
    held = held_over_100ms(node) - scene.lag_before
    print(f"the node grew by {grown / 2**20:.1f} MB; wake-ups over 100 ms late: {held:.0f}")
    assert held == 0, f"the event loop was held over 100 ms {held:.0f} times"
    assert node.process.poll() is None
    # Every grammar's worker went back to the pool or was stopped: no more than one a slot.
    assert node.metric("gguf_appliance_grammar_workers") <= 4
    assert "error parsing grammar" not in Path(node.log_path).read_text(errors="replace")
