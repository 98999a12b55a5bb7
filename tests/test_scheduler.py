from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from gguf_appliance.engine import DoneEvent, Engine, GenerationParams, TokenEvent
from gguf_appliance.errors import InvalidRequest
from gguf_appliance.grammar import Constraint
from gguf_appliance.llama import SamplingParams
from gguf_appliance.scheduler import common_prefix

from .conftest import collect, make_engine

TOPICS = ["a dragon", "the sea", "a robot", "a small village", "the moon", "a lost cat"]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0))


@pytest.fixture(scope="module")
def batch_engine(model_path: Path) -> Iterator[Engine]:
    eng = make_engine(
        model_path,
        n_ctx=2048,
        n_slots=4,
        n_batch=512,
        queue_size=8,
        retry_after=2,
        prefill_chunk=32,
    )
    yield eng
    eng.close()


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_greedy_answers_are_the_same_batched_as_alone(batch_engine: Engine) -> None:
    prompts = [batch_engine.tokenize_messages(chat(f"Write a story about {t}.")) for t in TOPICS]

    async def alone() -> list[str]:
        return [(await collect(batch_engine, p, greedy(48)))[0] for p in prompts]

    async def together() -> list[str]:
        results = await asyncio.gather(*(collect(batch_engine, p, greedy(48)) for p in prompts))
        return [text for text, _ in results]

    # A cache hit would make the second run cheaper but must not change the text: turn it off
    # by running "together" first, then "alone".
    batched = asyncio.run(together())
    single = asyncio.run(alone())
    assert batched == single
    assert len(set(batched)) == len(TOPICS)


def test_next_chat_turn_reuses_the_cached_prefix(batch_engine: Engine) -> None:
    async def scenario() -> tuple[DoneEvent, DoneEvent, int]:
        turn1 = chat("Tell me one fact about the moon.")
        prompt1 = batch_engine.tokenize_messages(turn1)
        answer, first = await collect(batch_engine, prompt1, greedy(40))
        turn2 = [
            *turn1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And one about the sun?"},
        ]
        _, second = await collect(batch_engine, batch_engine.tokenize_messages(turn2), greedy(40))
        return first, second, len(prompt1)

    first, second, turn1_tokens = asyncio.run(scenario())
    assert first.completion_tokens > 0
    assert second.cached_tokens >= turn1_tokens
    assert second.cached_tokens < second.prompt_tokens


def test_identical_prompt_reevaluates_only_its_last_token(batch_engine: Engine) -> None:
    prompt = batch_engine.tokenize_messages(chat("Name a colour."))

    async def twice() -> tuple[tuple[str, DoneEvent], tuple[str, DoneEvent]]:
        return await collect(batch_engine, prompt, greedy(8)), await collect(
            batch_engine, prompt, greedy(8)
        )

    (text1, _), (text2, done2) = asyncio.run(twice())
    assert text1 == text2
    assert done2.cached_tokens == len(prompt) - 1


def test_a_long_prompt_does_not_freeze_a_running_stream(batch_engine: Engine) -> None:
    # With prefill_chunk=32 a 1,500-token prompt is read over ~47 steps; the running stream gets a
    # token in each of them, so it keeps streaming before the long prompt's first token.
    long_prompt = batch_engine.tokenize_prompt(
        "The quick brown fox jumps over the lazy dog. " * 150
    )
    assert len(long_prompt) > 1400

    async def scenario() -> int:
        runner = batch_engine.submit(
            batch_engine.tokenize_messages(chat("Write a very long story about a dragon.")),
            GenerationParams(max_tokens=400, sampling=SamplingParams(temperature=0.7, seed=1)),
            timeout=120,
        )
        events = runner.events()
        for _ in range(3):
            assert isinstance(await anext(events), TokenEvent)
        tokens_meanwhile = 0
        long_events = batch_engine.submit(long_prompt, greedy(4), timeout=120).events()
        first_long = asyncio.ensure_future(anext(long_events))
        while not first_long.done():
            event = await anext(events)
            assert isinstance(event, TokenEvent)
            tokens_meanwhile += 1
        runner.cancel()
        async for _ in events:
            pass
        async for _ in long_events:
            pass
        return tokens_meanwhile

    assert asyncio.run(scenario()) >= 20


def test_queued_requests_start_in_arrival_order(engine: Engine) -> None:
    # One slot, so requests run one after another: they must end in the order they came.
    async def scenario() -> list[int]:
        finished: list[int] = []

        async def run(i: int, prompt: list[int]) -> None:
            await collect(engine, prompt, greedy(6))
            finished.append(i)

        prompts = [engine.tokenize_messages(chat(f"Write a story about {t}.")) for t in TOPICS[:3]]
        await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        return finished

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_cancel_frees_the_slot_at_once(batch_engine: Engine) -> None:
    async def scenario() -> int:
        generation = batch_engine.submit(
            batch_engine.tokenize_messages(chat("Write a very long story about the sea.")),
            GenerationParams(max_tokens=400, sampling=SamplingParams(temperature=0.7)),
            timeout=60,
        )
        events = generation.events()
        await anext(events)
        generation.cancel()
        async for _ in events:
            pass
        return batch_engine.busy_slots

    assert asyncio.run(scenario()) == 0


def test_a_grammar_holds_for_every_slot_of_a_sampled_batch(batch_engine: Engine) -> None:
    labels = ("positive", "negative", "neutral")
    grammar = "root ::= " + " | ".join(f'"{label}"' for label in labels)
    prompt = batch_engine.tokenize_messages(
        [{"role": "user", "content": "Is this review happy or sad? 'It was fine, I guess.'"}]
    )

    async def run() -> list[tuple[str, DoneEvent]]:
        # At most as many at once as the engine keeps grammar workers (N_SLOTS + 2): a 7th
        # would be refused with 503 whenever the earlier ones had not ended yet.
        gate = asyncio.Semaphore(4 + 2)

        async def one(seed: int) -> tuple[str, DoneEvent]:
            sampling = SamplingParams(
                temperature=1.5, top_k=0, min_p=0, seed=seed, grammar=Constraint.gbnf(grammar)
            )
            async with gate:
                return await collect(
                    batch_engine, prompt, GenerationParams(max_tokens=16, sampling=sampling)
                )

        return await asyncio.gather(*(one(seed) for seed in range(12)))

    results = asyncio.run(run())
    assert all(text in labels for text, _ in results), [text for text, _ in results]
    assert all(done.finish_reason == "stop" for _, done in results)
    assert len({text for text, _ in results}) > 1  # really sampled, yet never off the list


def test_an_unparsable_grammar_is_refused_at_submit(batch_engine: Engine) -> None:
    prompt = batch_engine.tokenize_prompt("Hello")
    bad = GenerationParams(
        max_tokens=4, sampling=SamplingParams(grammar=Constraint.gbnf('root ::= "a'))
    )
    with pytest.raises(InvalidRequest, match="grammar"):
        batch_engine.submit(prompt, bad, timeout=10)


def test_stream_interval_groups_tokens_into_fewer_events_with_the_same_text(
    model_path: Path, batch_engine: Engine
) -> None:
    """STREAM_INTERVAL: text decoded between two events goes out in one; nothing changes."""
    prompt = batch_engine.tokenize_messages(chat("Write a long story about a lighthouse."))

    async def timed(engine: Engine) -> tuple[list[tuple[float, str]], DoneEvent]:
        events: list[tuple[float, str]] = []
        async for event in engine.submit(prompt, greedy(64), timeout=120).events():
            if isinstance(event, TokenEvent):
                events.append((asyncio.get_running_loop().time(), event.text))
            elif isinstance(event, DoneEvent):
                return events, event
        raise AssertionError("no done event")

    every_token, done = asyncio.run(timed(batch_engine))
    assert done.completion_tokens == 64 and len(every_token) >= 60  # an event per token

    grouping = make_engine(model_path, n_ctx=2048, stream_interval=0.1)
    try:
        grouped, grouped_done = asyncio.run(timed(grouping))
    finally:
        grouping.close()
    assert grouped_done.completion_tokens == 64
    assert "".join(t for _, t in grouped) == "".join(t for _, t in every_token)
    # The first token goes out alone and at once; then events at least ~0.1 s apart, but the
    # last, which carries what was left at the end.
    assert grouped[0][1] == every_token[0][1]
    assert 3 <= len(grouped) <= 2 + grouped_done.duration / 0.1
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(grouped[:-1])]
    assert min(gaps) >= 0.08, gaps
