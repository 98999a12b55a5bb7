"""Traffic classes: batch keys and requests go after interactive ones, never on the last slot,
and are limited by key, not by address (NGINX passes keyed requests to the node's limits)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gguf_appliance.api.key_limits import KeyLimiter, Limits
from gguf_appliance.engine import DoneEvent, Engine, GenerationParams, TokenEvent
from gguf_appliance.errors import QueueFull, RateLimited
from gguf_appliance.keys import ApiKeys, KeyFileError, key_digest
from gguf_appliance.llama import Batch, SamplingParams
from gguf_appliance.scheduler import BATCH_PREFILL

from .conftest import RunningServer, free_port, make_engine, wait_for_condition
from .nginx_runner import RunningNginx, render_site
from .test_batch import assert_each_row_once, batch_command, batch_env, output_lines

BATCH_KEY = "batch-key-of-the-nightly-job"
CHAT_KEY = "interactive-key-of-the-chat-app"
TOPICS = ["a dragon", "the sea", "a robot", "a village", "the moon", "a cat", "a tree", "rain"]


def greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0))


def story(engine: Engine, topic: str) -> list[int]:
    return engine.tokenize_messages([{"role": "user", "content": f"Write a story about {topic}."}])


async def run(engine: Engine, prompt: list[int], max_tokens: int, *, batch: bool) -> DoneEvent:
    generation = engine.submit(prompt, greedy(max_tokens), timeout=120, batch=batch)
    async for event in generation.events():
        if isinstance(event, DoneEvent):
            return event
        if not isinstance(event, TokenEvent):
            raise event.error
    raise AssertionError("no done event")


@pytest.fixture(scope="module")
def two_slots(model_path: Path) -> Iterator[Engine]:
    eng = make_engine(model_path, n_ctx=1024, n_slots=2, queue_size=2, prefill_chunk=32)
    yield eng
    eng.close()


# --- the scheduler's admission order (the real model) ---


def test_an_interactive_request_starts_before_batch_requests_queued_earlier(
    two_slots: Engine,
) -> None:
    async def scenario() -> list[str]:
        finished: list[str] = []

        async def job(name: str, topic: str, max_tokens: int, batch: bool) -> None:
            await run(two_slots, story(two_slots, topic), max_tokens, batch=batch)
            finished.append(name)

        scheduler = two_slots.scheduler
        assert scheduler is not None
        # Both slots busy with interactive streams, one ending well before the other.
        holders = [
            asyncio.create_task(job("short", TOPICS[0], 24, False)),
            asyncio.create_task(job("long", TOPICS[1], 64, False)),
        ]
        await wait_for_condition(lambda: scheduler.busy_slots == 2, 10, "both slots busy")
        batch = [asyncio.create_task(job(f"batch{i}", TOPICS[2 + i], 4, True)) for i in range(2)]
        await wait_for_condition(lambda: scheduler.queue_depth == 2, 10, "batch jobs queued")
        chat = asyncio.create_task(job("chat", TOPICS[4], 4, False))
        await asyncio.gather(*holders, *batch, chat)
        return finished

    finished = asyncio.run(scenario())
    # First in first out, the batch jobs would take the slot "short" leaves before the chat.
    assert finished.index("chat") < finished.index("batch0") < finished.index("batch1")


def test_batch_jobs_never_hold_the_last_slot(two_slots: Engine) -> None:
    async def scenario() -> tuple[list[int], DoneEvent]:
        scheduler = two_slots.scheduler
        assert scheduler is not None
        busy: list[int] = []
        batch = [
            asyncio.create_task(run(two_slots, story(two_slots, t), 48, batch=True))
            for t in TOPICS[:3]
        ]
        await wait_for_condition(lambda: scheduler.queue_depth == 2, 10, "two batch jobs wait")
        busy.append(scheduler.busy_slots)
        chat = await run(two_slots, story(two_slots, TOPICS[5]), 4, batch=False)
        busy.append(scheduler.busy_slots)
        await asyncio.gather(*batch)
        return busy, chat

    busy, chat = asyncio.run(scenario())
    assert busy[0] == 1  # three batch jobs, two slots: one runs, the other slot is kept
    # The chat took the kept slot at once, not after a batch job's 48 tokens.
    assert chat.queue_seconds < 0.2, chat
    assert chat.finish_reason == "length"


def test_a_queue_full_of_batch_jobs_never_turns_an_interactive_request_away(
    two_slots: Engine,
) -> None:
    async def scenario() -> DoneEvent:
        scheduler = two_slots.scheduler
        assert scheduler is not None
        prompt = story(two_slots, TOPICS[6])
        generations = []
        with pytest.raises(QueueFull):  # one runs, two wait (queue_size), the fourth is refused
            for _ in range(4):
                generations.append(two_slots.submit(prompt, greedy(24), timeout=60, batch=True))
        assert len(generations) == 3
        chat = await run(two_slots, story(two_slots, TOPICS[7]), 4, batch=False)
        for generation in generations:
            async for _ in generation.events():
                pass
        return chat

    assert asyncio.run(scenario()).finish_reason == "length"


def record_steps(engine: Engine) -> list[list[tuple[int, int]]]:
    """A spy on the engine's decode calls (the real decode still runs): for each step, the
    (sequence id, position) of every token in its batch."""
    scheduler = engine.scheduler
    assert scheduler is not None
    model = scheduler.model
    decode = model.decode
    steps: list[list[tuple[int, int]]] = []

    def recording(batch: Batch) -> int:
        raw = batch.raw
        steps.append([(raw.seq_id[i][0], raw.pos[i]) for i in range(batch.n)])
        return decode(batch)

    model.decode = recording  # type: ignore[method-assign]
    return steps


def slot_of(engine: Engine, job_batch: bool) -> set[int]:
    scheduler = engine.scheduler
    assert scheduler is not None
    return {s.seq for s in scheduler.slots if s.job is not None and s.job.batch is job_batch}


def test_a_step_that_reads_a_chat_prompt_leaves_the_batch_streams_out(model_path: Path) -> None:
    engine = make_engine(model_path, n_ctx=1024, n_slots=3, queue_size=4, prefill_chunk=64)
    try:
        steps = record_steps(engine)
        scheduler = engine.scheduler
        assert scheduler is not None

        async def scenario() -> tuple[list[DoneEvent], set[int], set[int]]:
            batch = [
                asyncio.create_task(run(engine, story(engine, t), 48, batch=True))
                for t in TOPICS[:2]
            ]
            await wait_for_condition(
                lambda: (
                    scheduler.busy_slots == 2 and not any(s.prefilling for s in scheduler.slots)
                ),
                20,
                "two batch streams generating",
            )
            batch_seqs = slot_of(engine, True)
            chat = asyncio.create_task(run(engine, story(engine, TOPICS[4]), 4, batch=False))
            await wait_for_condition(lambda: bool(slot_of(engine, False)), 20, "the chat started")
            chat_seqs = slot_of(engine, False)
            return [*await asyncio.gather(*batch), await chat], batch_seqs, chat_seqs

        done, batch_seqs, chat_seqs = asyncio.run(scenario())
    finally:
        engine.close()
    (chat_seq,) = chat_seqs
    reading = [step for step in steps if sum(1 for seq, _ in step if seq == chat_seq) > 1]
    assert reading, steps  # the chat's prompt was read (several tokens of it in a step)
    for step in reading:  # ... in steps of its own
        assert {seq for seq, _ in step} == {chat_seq}, step
    # The batch streams went on around it, and lost nothing: all 48 tokens each.
    assert any({seq for seq, _ in step} >= batch_seqs | {chat_seq} for step in steps), steps
    assert [d.completion_tokens for d in done] == [48, 48, 4], done


def test_batch_jobs_leave_a_chat_s_cache_alone_while_another_slot_is_free(
    model_path: Path,
) -> None:
    engine = make_engine(model_path, n_ctx=1024, n_slots=3, queue_size=4, prefill_chunk=64)
    try:
        first = story(engine, TOPICS[3])

        async def scenario() -> DoneEvent:
            await run(engine, first, 8, batch=False)
            # Two batch jobs, whose prompts share the chat template's start with the chat's.
            await asyncio.gather(
                *(run(engine, story(engine, t), 8, batch=True) for t in TOPICS[5:7])
            )
            # The chat's next turn: its first prompt and more.
            more = engine.tokenize_messages(
                [
                    {"role": "user", "content": f"Write a story about {TOPICS[3]}."},
                    {"role": "assistant", "content": "Once upon a time."},
                    {"role": "user", "content": "Shorter, please."},
                ]
            )
            assert more[: len(first) - 2] == first[: len(first) - 2]
            return await run(engine, more, 4, batch=False)

        again = asyncio.run(scenario())
    finally:
        engine.close()
    # Its cache was still there: everything up to its first answer was reused, not re-read.
    assert again.cached_tokens >= len(first) - 2, again


def test_batch_prompts_are_read_a_few_tokens_a_step_only_while_chats_are_about(
    model_path: Path,
) -> None:
    engine = make_engine(model_path, n_ctx=1024, n_slots=2, queue_size=4, prefill_chunk=64)
    try:
        steps = record_steps(engine)
        text = " ".join(
            f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(12)
        )
        long_prompt = engine.tokenize_messages([{"role": "user", "content": text}])
        assert len(long_prompt) > 150

        def widest(before: int) -> int:
            return max(len(step) for step in steps[before:])

        async def scenario() -> tuple[int, int]:
            await run(engine, long_prompt, 1, batch=True)  # no chat yet: a chunk a step
            alone = widest(0)
            await run(engine, story(engine, TOPICS[0]), 2, batch=False)
            mark = len(steps)
            await run(engine, long_prompt[1:], 1, batch=True)  # a chat just now: 4 a step
            return alone, widest(mark)

        alone, near_chat = asyncio.run(scenario())
    finally:
        engine.close()
    assert alone == 64
    assert near_chat == BATCH_PREFILL == 4


# --- keys and their limits (no model) ---


def test_a_batch_line_of_the_key_file_gives_a_batch_key(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    digest = key_digest("hashed-batch-key-0001").hex()
    key_file.write_text(f"{CHAT_KEY}\nbatch:{BATCH_KEY}\nbatch:sha256:{digest}\n")
    keys = ApiKeys(["batch:fixed-batch-key-00001", "fixed-chat-key-000001"], key_file)
    classes = {}
    for key in (CHAT_KEY, BATCH_KEY, "hashed-batch-key-0001", "fixed-batch-key-00001"):
        digest_in_force = keys.match(f"Bearer {key}".encode())
        assert digest_in_force is not None, key
        classes[key] = keys.is_batch(digest_in_force)
    assert classes == {
        CHAT_KEY: False,
        BATCH_KEY: True,
        "hashed-batch-key-0001": True,
        "fixed-batch-key-00001": True,
    }
    assert keys.match(b"Bearer fixed-chat-key-000001") is not None
    assert keys.match(f"Bearer batch:{BATCH_KEY}".encode()) is None  # the mark is no key
    key_file.write_text("batch:short\n")
    with pytest.raises(KeyFileError, match="line 1"):
        ApiKeys([], key_file)


def test_a_key_over_its_streams_or_its_rate_gets_429_and_others_do_not() -> None:
    limiter = KeyLimiter(interactive=Limits(2, 1.0), batch=Limits(4, 100.0))
    limiter.acquire(b"chat", batch=False)
    limiter.acquire(b"chat", batch=False)
    with pytest.raises(RateLimited, match="in flight") as refused:
        limiter.acquire(b"chat", batch=False)
    assert refused.value.status_code == 429 and refused.value.retry_after == 1
    for _ in range(4):
        limiter.acquire(b"batch", batch=True)  # another key: its own count
    limiter.release(b"chat")
    limiter.acquire(b"chat", batch=False)  # a stream ended: room again
    for _ in range(2):  # the burst (5 s of 1 r/s) is spent after five requests
        limiter.release(b"chat")
        limiter.acquire(b"chat", batch=False)
    limiter.release(b"chat")
    with pytest.raises(RateLimited, match="a second"):
        limiter.acquire(b"chat", batch=False)


# --- through NGINX: a batch job at concurrency 16 beside a chat user ---


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def first_token_seconds(client: httpx.Client, url: str, topic: str) -> float:
    body = {
        "messages": [{"role": "user", "content": f"In one sentence, what is {topic}?"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {CHAT_KEY}"}
    started = time.perf_counter()
    with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return time.perf_counter() - started
    raise AssertionError("the chat streamed no text")


def test_a_batch_job_through_nginx_loses_no_row_and_chat_first_tokens_stay_near_idle(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"{CHAT_KEY}\nbatch:{BATCH_KEY}\n")
    node = RunningServer(
        {
            "GGUF_APPLIANCE_API_KEY_FILE": str(key_file),
            "GGUF_APPLIANCE_N_SLOTS": "4",
            "GGUF_APPLIANCE_N_CTX": "1024",
        },
        tmp_path / "server.log",
    )
    port = free_port()
    nginx = None
    # One client for the chat user and the busy-slot reads, on kept connections as a browser's:
    # a new httpx client costs ~28 ms of CPU (its TLS context), which would be counted in every
    # first token and, beside the batch job, would take that CPU from the node's decode threads.
    chat = httpx.Client()
    try:
        node.wait_ready()
        conf = render_site(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{node.port}", "127.0.0.1/32")
        nginx = RunningNginx(conf, port)
        first_token_seconds(chat, nginx.url, "warm")  # the first request pays for lazy set-up
        # The idle node's first tokens, half before the batch job and half after it, so a drift
        # of this shared machine's speed meanwhile weighs on both sides alike.
        idle = [first_token_seconds(chat, nginx.url, TOPICS[i % len(TOPICS)]) for i in range(10)]

        rows = [{"id": i, "text": f"Name a fruit, reply {i}."} for i in range(300)]
        src = tmp_path / "rows.jsonl"
        src.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out = tmp_path / "out.jsonl"
        args = [
            *("--task", "template", "--template", "{text}", "--max-tokens", "4"),
            *("--target", nginx.url, "--api-key", BATCH_KEY, "--concurrency", "16"),
        ]
        started = time.monotonic()
        job = subprocess.Popen(
            batch_command(str(src), str(out), *args),
            env=batch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        loaded: list[float] = []
        try:
            # A chat a second while the job runs (the wait ends early when the job does).
            while job.poll() is None:
                sent = time.monotonic()
                busy = node.metric("gguf_appliance_busy_slots", 0, chat)
                if busy:  # a chat sent when the batch job is in the slots
                    loaded.append(first_token_seconds(chat, nginx.url, TOPICS[len(loaded) % 8]))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.wait(timeout=max(0.0, 1.0 - (time.monotonic() - sent)))
            stdout, stderr = job.communicate(timeout=30)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        took = time.monotonic() - started
        idle += [first_token_seconds(chat, nginx.url, TOPICS[i % len(TOPICS)]) for i in range(10)]
    finally:
        chat.close()
        if nginx is not None:
            nginx.stop()
        node.stop()

    assert job.returncode == 0, stderr
    summary = json.loads(stdout)
    lines = output_lines(out)
    assert_each_row_once(lines, [row["id"] for row in rows])
    assert not [line for line in lines if "error" in line]
    # Neither NGINX's per-address limits nor the node's batch key limits slowed it: no 429.
    assert summary["retries"] == 0, summary
    assert len(loaded) >= 5, (loaded, took)
    print(
        f"batch: 300 rows in {took:.1f} s; first token p95 idle {p95(idle) * 1000:.0f} ms, "
        f"beside the batch job {p95(loaded) * 1000:.0f} ms ({len(loaded)} chats)",
        sorted(round(x * 1000) for x in idle),
        sorted(round(x * 1000) for x in loaded),
    )
    # The bound (measured: docs/pool.md).
    assert p95(loaded) <= 2 * p95(idle), (idle, loaded)
