"""Log probabilities: the engine's are the model's own (log-softmax of the raw logits), checked
against a second llama.cpp context of the same model evaluating the same tokens the way the
engine does (the prompt in one batch, then one token a step: llama.cpp's numbers depend on the
batch's shape); the OpenAI client reads them, streamed and not, in both of OpenAI's shapes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp as C
import numpy as np
import openai
import pytest

from gguf_appliance.engine import DoneEvent, Engine, GenerationParams, TokenEvent
from gguf_appliance.generation import Logprob
from gguf_appliance.llama import Batch, LlamaModel, SamplingParams
from gguf_appliance.scheduler import SCORE_ROWS

from .conftest import RunningServer, make_engine

GREEDY = SamplingParams(temperature=0.0)
COLOURS = [{"role": "user", "content": "Name three colours."}]
TOLERANCE = 1e-4


class Reference:
    """The model in a context of its own: log-softmax rows computed here, in float64."""

    def __init__(self, path: Path) -> None:
        self.model = LlamaModel(path, n_ctx=2048, n_seq=1, n_batch=1024, threads=2)

    def rows(self, prompt: list[int], answer: list[int], chunk: int = 1024) -> np.ndarray:
        """Row i: the log probabilities of what follows token i of prompt + answer."""
        self.model.forget(0, 0)
        steps = [prompt[i : i + chunk] for i in range(0, len(prompt), chunk)]
        steps += [[token] for token in answer]
        rows, position = [], 0
        for step in steps:
            rows += self._decode(step, position)
            position += len(step)
        return np.array(rows)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        tokens: list[int] = []
        row = self.rows(prompt, [])[-1]
        for _ in range(steps):
            tokens.append(int(np.argmax(row)))
            row = self._decode(tokens[-1:], len(prompt) + len(tokens) - 1)[0]
        return tokens

    def _decode(self, tokens: list[int], position: int) -> list[np.ndarray]:
        model = self.model
        batch = Batch(len(tokens))
        try:
            for i, token in enumerate(tokens):
                batch.add(token, position + i, 0, True)
            assert model.decode(batch) == 0
            logits = [
                np.ctypeslib.as_array(C.llama_get_logits_ith(model.ctx, i), shape=(model.n_vocab,))
                for i in range(len(tokens))
            ]
        finally:
            batch.free()
        scores = np.array(logits, dtype=np.float64)
        peak = scores.max(axis=1, keepdims=True)
        return list(scores - (peak + np.log(np.exp(scores - peak).sum(axis=1, keepdims=True))))

    def close(self) -> None:
        self.model.close()


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Iterator[Reference]:
    ref = Reference(model_path)
    yield ref
    ref.close()


def check_entry(entry: Logprob, row: np.ndarray, k: int) -> None:
    """`entry` holds `row`'s value for its token and `row`'s k likeliest tokens, in order."""
    assert entry.logprob is not None
    assert abs(entry.logprob - row[entry.token]) < TOLERANCE
    best = np.argsort(-row, kind="stable")[:k]
    assert [a.token for a in entry.top] == [int(t) for t in best]
    for alternative in entry.top:
        assert alternative.logprob is not None
        assert abs(alternative.logprob - row[alternative.token]) < TOLERANCE


async def events(engine: Engine, prompt: list[int], params: GenerationParams) -> list[Any]:
    return [e async for e in engine.submit(prompt, params, timeout=120).events()]


def answer_logprobs(got: list[Any]) -> list[Logprob]:
    return [e for ev in got if isinstance(ev, TokenEvent) and not ev.prompt for e in ev.logprobs]


def test_generated_tokens_carry_the_models_logprobs(engine: Engine, reference: Reference) -> None:
    prompt = engine.tokenize_messages(COLOURS)
    got = asyncio.run(events(engine, prompt, GenerationParams(24, GREEDY, logprobs=5)))
    done = got[-1]
    assert isinstance(done, DoneEvent)
    entries = answer_logprobs(got)
    assert len(entries) == done.completion_tokens > 0
    text = "".join(e.text for e in got if isinstance(e, TokenEvent))
    assert b"".join(e.piece for e in entries).decode() == text
    rows = reference.rows(prompt, [e.token for e in entries])
    for i, entry in enumerate(entries):
        check_entry(entry, rows[len(prompt) - 1 + i], 5)
        assert entry.top[0].token == entry.token  # greedy: the likeliest


def test_sampled_tokens_too_and_none_without_asking(engine: Engine, reference: Reference) -> None:
    prompt = engine.tokenize_messages([{"role": "user", "content": "Tell me about cats."}])
    sampled = SamplingParams(temperature=1.3, seed=7)
    got = asyncio.run(events(engine, prompt, GenerationParams(16, sampled, logprobs=0)))
    entries = answer_logprobs(got)
    rows = reference.rows(prompt, [e.token for e in entries])
    for i, entry in enumerate(entries):
        check_entry(entry, rows[len(prompt) - 1 + i], 0)
    plain = asyncio.run(events(engine, prompt, GenerationParams(16, sampled)))
    assert all(not e.logprobs for e in plain if isinstance(e, TokenEvent))
    assert "".join(e.text for e in plain if isinstance(e, TokenEvent)) == "".join(
        e.text for e in got if isinstance(e, TokenEvent)
    )


def test_a_scored_prompt_with_no_answer(engine: Engine, reference: Reference) -> None:
    prompt = engine.tokenize_prompt("The capital of France is Paris, and the capital of Italy is")
    # Twice: the second must not take the first's cached prefix (it would lack its logits).
    for _ in range(2):
        params = GenerationParams(0, GREEDY, logprobs=3, score_prompt=True)
        got = asyncio.run(events(engine, prompt, params))
        assert len(got) == 2
        scored, done = got
        assert isinstance(scored, TokenEvent) and scored.prompt and scored.text == ""
        assert isinstance(done, DoneEvent)
        assert (done.finish_reason, done.completion_tokens, done.cached_tokens) == ("length", 0, 0)
        assert [e.token for e in scored.logprobs] == prompt
        assert scored.logprobs[0].logprob is None and scored.logprobs[0].top == ()
        rows = reference.rows(prompt, [])
        for i, entry in enumerate(scored.logprobs[1:]):
            check_entry(entry, rows[i], 3)


def test_a_long_scored_prompt_is_read_in_bounded_chunks(
    engine: Engine, reference: Reference
) -> None:
    prompt = engine.tokenize_prompt("One two three four five six seven eight nine ten. " * 14)
    assert len(prompt) > 2 * SCORE_ROWS
    params = GenerationParams(3, GREEDY, logprobs=1, score_prompt=True)
    got = asyncio.run(events(engine, prompt, params))
    scored = got[0]
    assert isinstance(scored, TokenEvent) and scored.prompt
    assert len(scored.logprobs) == len(prompt)
    answer = answer_logprobs(got)
    assert len(answer) == 3
    rows = reference.rows(prompt, [e.token for e in answer], chunk=SCORE_ROWS)
    for i, entry in enumerate(scored.logprobs[1:]):
        check_entry(entry, rows[i], 1)
    for i, entry in enumerate(answer):
        check_entry(entry, rows[len(prompt) - 1 + i], 1)


def test_grouped_events_carry_every_tokens_logprobs(model_path: Path) -> None:
    """STREAM_INTERVAL merges tokens into one event: it carries all of their logprobs."""
    grouping = make_engine(model_path, stream_interval=0.1)
    try:
        prompt = grouping.tokenize_messages(COLOURS)
        got = asyncio.run(events(grouping, prompt, GenerationParams(48, GREEDY, logprobs=2)))
    finally:
        grouping.close()
    tokens = [e for e in got if isinstance(e, TokenEvent)]
    done = got[-1]
    assert isinstance(done, DoneEvent)
    assert len(tokens) < done.completion_tokens  # merged
    assert any(len(e.logprobs) > 1 for e in tokens)
    entries = answer_logprobs(got)
    assert len(entries) == done.completion_tokens
    assert b"".join(e.piece for e in entries).decode() == "".join(e.text for e in tokens)


def test_a_stop_strings_tokens_are_not_in_the_logprobs(engine: Engine) -> None:
    prompt = engine.tokenize_messages(
        [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    )
    got = asyncio.run(events(engine, prompt, GenerationParams(80, GREEDY, ("7",), logprobs=0)))
    text = "".join(e.text for e in got if isinstance(e, TokenEvent))
    pieces = b"".join(e.piece for e in answer_logprobs(got)).decode()
    assert got[-1].finish_reason == "stop" and "7" not in text
    assert pieces.startswith(text) and "7" not in pieces


# --- through the HTTP API, with the official client ---


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A node that evaluates every prompt whole (no cached prefix), as the reference does."""
    log_dir = tmp_path_factory.mktemp("logprobs-node")
    env = {"GGUF_APPLIANCE_N_CTX": "2048", "GGUF_APPLIANCE_REUSE_PREFIX": "false"}
    running = RunningServer(env, log_dir / "server.log")
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(node: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url("/v1"), api_key="x", max_retries=0)


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI, reference: Reference) -> None:
    args: dict[str, Any] = {
        "model": "any",
        "messages": COLOURS,
        "max_tokens": 20,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 4,
    }
    whole = client.chat.completions.create(**args)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert all(bytes(t.bytes or []).decode() == t.token for t in content)
    prompt = reference.model.chat_prompt(COLOURS)
    answer = reference.greedy(prompt, len(content))
    assert [reference.model.piece(t) for t in answer] == [bytes(t.bytes or []) for t in content]
    rows = reference.rows(prompt, answer)
    for i, (token, entry) in enumerate(zip(answer, content, strict=True)):
        row = rows[len(prompt) - 1 + i]
        assert abs(entry.logprob - row[token]) < TOLERANCE
        best = [reference.model.piece(int(t)) for t in np.argsort(-row, kind="stable")[:4]]
        assert [bytes(a.bytes or []) for a in entry.top_logprobs] == best
    assert whole.usage is not None and whole.usage.completion_tokens == len(content)

    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [
        [a.token for a in t.top_logprobs] for t in content
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content


def test_chat_without_logprobs_has_none(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="any", messages=COLOURS, max_tokens=4)
    assert reply.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt_without_generating(
    client: openai.OpenAI, reference: Reference
) -> None:
    text = "The capital of France is Paris, and the capital of Italy is"
    reply = client.completions.create(model="any", prompt=text, echo=True, logprobs=3, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == text
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None and logprobs.text_offset is not None
    prompt = reference.model.text_prompt(text)
    assert logprobs.tokens == [reference.model.piece(t).decode() for t in prompt]
    assert "".join(logprobs.tokens) == text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    rows = reference.rows(prompt, [], chunk=SCORE_ROWS)
    for i, token in enumerate(prompt[1:]):
        value = logprobs.token_logprobs[i + 1]
        assert value is not None and abs(value - rows[i][token]) < TOLERANCE
        top = logprobs.top_logprobs[i + 1]
        assert top is not None and 3 <= len(top) <= 4
        for t in np.argsort(-rows[i], kind="stable")[:3]:
            assert abs(top[reference.model.piece(int(t)).decode()] - rows[i][t]) < TOLERANCE
    starts = [len("".join(logprobs.tokens[:i])) for i in range(len(prompt))]
    assert logprobs.text_offset == starts


def test_completion_echo_with_an_answer_streamed_and_not(client: openai.OpenAI) -> None:
    text = "The capital of France is"
    args: dict[str, Any] = {
        "model": "any",
        "prompt": text,
        "echo": True,
        "logprobs": 2,
        "max_tokens": 6,
        "temperature": 0,
    }
    whole = client.completions.create(**args).choices[0]
    assert whole.text.startswith(text) and len(whole.text) > len(text)
    lp = whole.logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert "".join(lp.tokens) == whole.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert chunks[0].choices[0].text == text  # the echo, with the prompt's logprobs
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            for key, values in streamed.items():
                values.extend(getattr(c.choices[0].logprobs, key))
    assert streamed == {
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "text_offset": lp.text_offset,
    }
    # Without echo the answer's offsets still count from the prompt's start, as OpenAI's do.
    plain = client.completions.create(**{**args, "echo": False}).choices[0]
    assert plain.text == whole.text[len(text) :]
    assert plain.logprobs is not None and plain.logprobs.text_offset is not None
    assert plain.logprobs.text_offset[0] == len(text)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": COLOURS, "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": COLOURS, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"messages": COLOURS, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": -1, "echo": True}, "max_tokens"),
    ],
)
def test_logprobs_out_of_bounds_are_refused_naming_the_field(
    node: RunningServer, path: str, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(node.url(path), json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
