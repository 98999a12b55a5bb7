"""`n`: several choices of one prompt, read once and copied to sibling slots; each samples on
its own. A request's choices start together: it waits at the head of the queue for its slots."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gguf_appliance.engine import DoneEvent, Engine, Generation, GenerationParams, TokenEvent
from gguf_appliance.errors import InvalidRequest, QueueFull
from gguf_appliance.grammar import Constraint
from gguf_appliance.llama import LlamaModel, SamplingParams

from .conftest import RunningServer, make_engine, wait_for_condition

COLOURS = [{"role": "user", "content": "Name three colours."}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]


@pytest.fixture(scope="module")
def engine4(model_path: Path) -> Iterator[Engine]:
    eng = make_engine(model_path, n_ctx=1024, n_slots=4, queue_size=2, reuse_prefix=False)
    yield eng
    eng.close()


async def run(
    engine: Engine, prompt: list[int], params: GenerationParams
) -> tuple[dict[int, str], DoneEvent]:
    texts: dict[int, list[str]] = {}
    async for event in engine.submit(prompt, params, timeout=120).events():
        if isinstance(event, TokenEvent):
            texts.setdefault(event.choice, []).append(event.text)
        elif isinstance(event, DoneEvent):
            return {i: "".join(t) for i, t in sorted(texts.items())}, event
        else:
            raise event.error
    raise AssertionError("no done event")


def test_greedy_choices_all_equal_the_single_answer(engine4: Engine) -> None:
    # Each sibling's first token and its whole answer come from the copied KV: a wrong copy
    # would show here.
    prompt = engine4.tokenize_messages(COLOURS)
    greedy = SamplingParams(temperature=0.0)
    (single, one) = asyncio.run(run(engine4, prompt, GenerationParams(24, greedy)))
    texts, done = asyncio.run(run(engine4, prompt, GenerationParams(24, greedy, n=3)))
    assert list(texts) == [0, 1, 2]
    assert all(text == single[0] for text in texts.values())
    assert done.prompt_tokens == len(prompt)  # read once
    assert done.completion_tokens == 3 * one.completion_tokens
    assert done.choice_reasons == (one.finish_reason,) * 3
    assert engine4.busy_slots == 0


def test_seeded_choices_differ_and_choice_i_takes_seed_plus_i(engine4: Engine) -> None:
    prompt = engine4.tokenize_messages(COLOURS)

    def sampled(seed: int, n: int = 1) -> GenerationParams:
        return GenerationParams(16, SamplingParams(temperature=1.0, seed=seed), n=n)

    texts, done = asyncio.run(run(engine4, prompt, sampled(40, n=3)))
    assert len(set(texts.values())) == 3
    again, _ = asyncio.run(run(engine4, prompt, sampled(40, n=3)))
    assert again == texts
    for i in range(3):
        alone, _ = asyncio.run(run(engine4, prompt, sampled(40 + i)))
        assert alone[0] == texts[i]
    assert len(done.choice_reasons) == 3


def test_every_choice_gets_the_prompt_scores_and_its_own_logprobs(engine4: Engine) -> None:
    prompt = engine4.tokenize_prompt("The capital of France is")
    params = GenerationParams(
        6, SamplingParams(temperature=1.0, seed=3), logprobs=1, score_prompt=True, n=2
    )

    async def scenario() -> list[Any]:
        return [e async for e in engine4.submit(prompt, params, timeout=120).events()]

    got = asyncio.run(scenario())
    scored = [e for e in got if isinstance(e, TokenEvent) and e.prompt]
    assert sorted(e.choice for e in scored) == [0, 1]
    assert scored[0].logprobs == scored[1].logprobs
    assert [e.token for e in scored[0].logprobs] == prompt
    done = got[-1]
    assert isinstance(done, DoneEvent)
    counted = sum(len(e.logprobs) for e in got if isinstance(e, TokenEvent) and not e.prompt)
    assert counted == done.completion_tokens


def test_a_request_of_n_waits_for_n_free_slots_and_later_ones_wait_behind_it(
    engine4: Engine,
) -> None:
    story = engine4.tokenize_messages(STORY)
    long = GenerationParams(400, SamplingParams(temperature=0.7, seed=1))

    async def scenario() -> list[str]:
        holders = [engine4.submit(story, long, timeout=120) for _ in range(3)]
        streams = [h.events() for h in holders]
        for s in streams:  # all three hold their slot
            assert isinstance(await anext(s), TokenEvent)
        order: list[str] = []

        async def follow(name: str, generation: Generation) -> None:
            async for event in generation.events():
                if name not in order:
                    order.append(name)
                if isinstance(event, DoneEvent):
                    return

        pair = engine4.submit(story, GenerationParams(4, n=2), timeout=120)
        single = engine4.submit(story, GenerationParams(4), timeout=120)
        # The queue holds 2: the pair and the single wait (one slot is free, but the single
        # does not pass the pair), so a third would be one too many.
        with pytest.raises(QueueFull):
            engine4.submit(story, GenerationParams(4), timeout=120)
        # Three slots busy (the holders), the pair and the single queued behind the free one.
        await wait_for_condition(
            lambda: engine4.busy_slots == 3, 10, "the holders never took their slots"
        )
        assert engine4.busy_slots == 3 and engine4.queue_depth == 2
        tasks = [
            asyncio.ensure_future(follow(n, g)) for n, g in (("pair", pair), ("single", single))
        ]
        holders[0].cancel()
        await asyncio.gather(*tasks)
        for h in holders[1:]:
            h.cancel()
        for s in streams:
            async for _ in s:
                pass
        return order

    assert asyncio.run(scenario()) == ["pair", "single"]
    assert engine4.busy_slots == 0 and engine4.queue_depth == 0


def test_cancelling_a_request_ends_all_its_choices(engine4: Engine) -> None:
    story = engine4.tokenize_messages(STORY)

    async def scenario() -> DoneEvent:
        generation = engine4.submit(story, GenerationParams(400, n=4), timeout=120)
        events = generation.events()
        await anext(events)
        generation.cancel()
        last = None
        async for event in events:
            last = event
        assert isinstance(last, DoneEvent)
        return last

    done = asyncio.run(scenario())
    assert done.finish_reason == "cancelled"
    assert set(done.choice_reasons) == {"cancelled"} and len(done.choice_reasons) == 4
    assert engine4.busy_slots == 0


def test_n_beyond_the_slots_or_with_a_grammar_is_refused(engine4: Engine) -> None:
    prompt = engine4.tokenize_prompt("Hello")
    with pytest.raises(InvalidRequest) as caught:
        engine4.check_params(GenerationParams(4, n=5))
    assert caught.value.param == "n"
    constrained = SamplingParams(grammar=Constraint.json_object())
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(run(engine4, prompt, GenerationParams(4, constrained, n=2)))
    assert caught.value.param == "n"


# --- through the API, with the official client ---


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0)


def test_chat_n_streamed_and_not(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "any",
        "messages": COLOURS,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "logprobs": True,
    }
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content or "" for c in whole.choices]
    assert len(set(texts)) > 1
    assert whole.usage is not None
    counted = sum(len(c.logprobs.content or []) for c in whole.choices if c.logprobs)
    assert whole.usage.completion_tokens == counted
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    streamed = ["", "", ""]
    finished = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert streamed == texts
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_n_with_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="any", prompt="Once upon a time", n=2, echo=True, max_tokens=6, seed=5
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text.startswith("Once upon a time") for c in reply.choices)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": COLOURS, "n": 9},  # the shared node has 8 slots
        {"messages": COLOURS, "n": 2, "response_format": {"type": "json_object"}},
        {"messages": COLOURS, "n": 0},
    ],
)
def test_n_out_of_bounds_is_refused_naming_n(server: RunningServer, body: dict[str, Any]) -> None:
    response = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"


# --- completions: a list of prompts, token ids ---


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[LlamaModel]:
    model = LlamaModel(model_path, n_ctx=256, n_seq=1, n_batch=64, threads=1)
    yield model
    model.close()


def test_a_list_of_prompts_gives_each_its_choices_in_order(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    args: dict[str, Any] = {"model": "any", "max_tokens": 8, "temperature": 0}
    alone = [client.completions.create(prompt=p, **args) for p in prompts]
    together = client.completions.create(prompt=prompts, n=2, **args)
    assert [c.index for c in together.choices] == list(range(6))
    for i, reply in enumerate(alone):
        assert together.choices[2 * i].text == reply.choices[0].text
        assert together.choices[2 * i + 1].text == reply.choices[0].text
    assert together.usage is not None
    assert together.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone if r.usage)
    assert together.usage.completion_tokens == 2 * sum(
        r.usage.completion_tokens for r in alone if r.usage
    )
    streamed = [""] * 6
    for chunk in client.completions.create(prompt=prompts, n=2, stream=True, **args):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in together.choices]


def test_token_id_prompts_read_as_their_text(client: openai.OpenAI, vocab: LlamaModel) -> None:
    texts = ["The capital of France is", "Once upon a time"]
    ids = [vocab.text_prompt(t) for t in texts]
    args: dict[str, Any] = {"model": "any", "max_tokens": 6, "temperature": 0}
    by_text = client.completions.create(prompt=texts[0], **args).choices[0].text
    by_ids = client.completions.create(prompt=ids[0], echo=True, **args).choices[0].text
    assert by_ids == texts[0] + by_text
    both = client.completions.create(prompt=ids, **args)
    assert both.choices[0].text == by_text
    assert both.usage is not None and both.usage.prompt_tokens == sum(map(len, ids))


@pytest.mark.parametrize(
    ("prompt", "n"),
    [
        ([49152], 1),  # the bundled model's vocabulary is 0 to 49,151
        ([[1, 2], [3, 99999]], 1),
        ([-1], 1),
        ([True, 1], 1),
        ([], 1),
        ([[]], 1),
        ([1, "a"], 1),
        (["a"] * 9, 1),  # more prompts than the shared node's 8 slots
        ([[1, 2]] * 65, 1),
    ],
)
def test_prompts_out_of_bounds_are_refused_naming_prompt(
    server: RunningServer, prompt: Any, n: int
) -> None:
    body = {"prompt": prompt, "n": n, "max_tokens": 2}
    response = httpx.post(server.url("/v1/completions"), json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_prompts_times_n_beyond_the_slots_is_refused_naming_n(server: RunningServer) -> None:
    body = {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2}
    response = httpx.post(server.url("/v1/completions"), json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
