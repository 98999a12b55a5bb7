from __future__ import annotations

import asyncio
import time

import pytest

from gguf_appliance.engine import DoneEvent, Engine, ErrorEvent, GenerationParams, TokenEvent
from gguf_appliance.errors import InvalidRequest, PromptTooLong, QueueFull
from gguf_appliance.llama import SamplingParams

from .conftest import collect, wait_for_condition

GREEDY = SamplingParams(temperature=0.0)
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


def params(max_tokens: int = 64, stop: tuple[str, ...] = (), **sampling: float) -> GenerationParams:
    return GenerationParams(
        max_tokens=max_tokens,
        sampling=SamplingParams(**{"temperature": 0.0, **sampling}),  # type: ignore[arg-type]
        stop=stop,
    )


def test_greedy_generation_is_repeatable_and_counts_tokens(engine: Engine) -> None:
    prompt = engine.tokenize_messages([{"role": "user", "content": "Name three colours."}])
    first = asyncio.run(collect(engine, prompt, params(24)))
    second = asyncio.run(collect(engine, prompt, params(24)))
    assert first[0] == second[0] and first[0].strip()
    done = first[1]
    assert done.prompt_tokens == len(prompt)
    assert 0 < done.completion_tokens <= 24
    assert done.time_to_first_token is not None and done.time_to_first_token > 0


def test_max_tokens_ends_with_length(engine: Engine) -> None:
    text, done = asyncio.run(collect(engine, engine.tokenize_messages(STORY), params(7)))
    assert text
    assert done.finish_reason == "length"
    assert done.completion_tokens == 7


def test_stop_string_ends_the_answer_before_it(engine: Engine) -> None:
    prompt = engine.tokenize_messages(
        [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    )
    full, _ = asyncio.run(collect(engine, prompt, params(80)))
    assert "7" in full
    cut, done = asyncio.run(collect(engine, prompt, params(80, stop=("7",))))
    assert done.finish_reason == "stop"
    assert "7" not in cut
    assert full.startswith(cut)


def test_cancel_stops_generation_within_one_token(engine: Engine) -> None:
    async def scenario() -> tuple[int, int, DoneEvent]:
        generation = engine.submit(engine.tokenize_messages(STORY), params(400), timeout=60)
        events = generation.events()
        for _ in range(5):
            assert isinstance(await anext(events), TokenEvent)
        generation.cancel()
        at_cancel = engine.token_totals()[2]
        last = None
        async for event in events:
            last = event
        await wait_for_condition(lambda: engine.busy_slots == 0, 5, "the slot never freed")
        assert isinstance(last, DoneEvent)
        return at_cancel, engine.token_totals()[2], last

    at_cancel, later, done = asyncio.run(scenario())
    assert done.finish_reason == "cancelled"
    assert later - at_cancel <= 1
    assert engine.busy_slots == 0


def test_deadline_ends_a_running_generation(engine: Engine) -> None:
    async def scenario() -> DoneEvent:
        generation = engine.submit(engine.tokenize_messages(STORY), params(400), timeout=0.3)
        async for event in generation.events():
            if isinstance(event, DoneEvent):
                return event
        raise AssertionError

    started = time.monotonic()
    done = asyncio.run(scenario())
    assert done.finish_reason == "timeout"
    assert time.monotonic() - started < 1.5
    assert 0 < done.completion_tokens < 400


def test_prompt_longer_than_the_context_is_refused_with_its_size(engine: Engine) -> None:
    prompt = engine.tokenize_prompt("word " * 2000)
    with pytest.raises(PromptTooLong) as caught:
        asyncio.run(collect(engine, prompt, params(8)))
    assert f"{len(prompt)} tokens" in caught.value.message
    assert f"{engine.slot_context} tokens" in caught.value.message
    assert caught.value.status_code == 400


def test_max_tokens_above_the_cap_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="at most 512"):
        asyncio.run(collect(engine, engine.tokenize_prompt("hi"), params(513)))


def test_full_queue_refuses_with_retry_after(engine: Engine) -> None:
    # One slot and a queue of two: the fourth concurrent request is refused at once.
    async def scenario() -> QueueFull:
        prompt = engine.tokenize_messages(STORY)
        running = [engine.submit(prompt, params(300), timeout=60) for _ in range(3)]
        try:
            with pytest.raises(QueueFull) as caught:
                engine.submit(prompt, params(300), timeout=60)
            return caught.value
        finally:
            for generation in running:
                generation.cancel()
            for generation in running:
                async for _ in generation.events():
                    pass

    error = asyncio.run(scenario())
    assert error.status_code == 503
    assert error.retry_after == 3
    assert engine.queue_depth == 0 and engine.busy_slots == 0


def test_abort_ends_running_and_queued_requests_with_an_error(engine: Engine) -> None:
    from gguf_appliance.errors import Draining

    async def scenario() -> list[object]:
        prompt = engine.tokenize_messages(STORY)
        generations = [engine.submit(prompt, params(300), timeout=60) for _ in range(2)]
        await wait_for_condition(
            lambda: engine.busy_slots == 1 and engine.queue_depth == 1,
            5,
            "never one generation running and one queued",
        )
        engine.abort_all(Draining("bye"))
        ends = []
        for generation in generations:
            async for event in generation.events():
                if not isinstance(event, TokenEvent):
                    ends.append(event)
        return ends

    ends = asyncio.run(scenario())
    assert all(isinstance(e, ErrorEvent) and e.error.message == "bye" for e in ends)
    assert len(ends) == 2
