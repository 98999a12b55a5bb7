"""1,000 mixed requests with random disconnects: nothing leaks (slots, tasks, fds, memory)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from typing import Any

import httpx

from .conftest import RunningServer, wait_until

TOPICS = ["dragons", "the sea", "robots", "bread", "the moon", "rivers", "chess", "owls"]


async def one_request(client: httpx.AsyncClient, rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    messages = [{"role": "user", "content": f"Tell me about {topic}."}]
    kind = rng.choices(
        ["stream", "stream_cut", "chat", "completion_stream", "chat_cut", "bad_json"],
        weights=[40, 20, 15, 10, 10, 5],
    )[0]
    try:
        if kind in ("stream", "stream_cut"):
            body = {"messages": messages, "max_tokens": rng.randint(1, 16)}
            async with client.stream("POST", "/generate", json=body) as response:
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("event: token")
                    if kind == "stream_cut" and seen >= rng.randint(1, 3):
                        return "cut"  # leaving the block closes the connection mid-stream
                return str(response.status_code)
        if kind == "chat":
            body = {"messages": messages, "max_tokens": rng.randint(1, 8)}
            return str((await client.post("/v1/chat/completions", json=body)).status_code)
        if kind == "completion_stream":
            body = {
                "prompt": f"Facts about {topic}:",
                "max_tokens": rng.randint(1, 8),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with client.stream("POST", "/v1/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines()]
                assert "data: [DONE]" in lines
                return str(response.status_code)
        if kind == "chat_cut":
            body = {"messages": messages, "max_tokens": 200}
            await client.post("/v1/chat/completions", json=body, timeout=0.05 + rng.random() / 5)
            return "200"
        response = await client.post(
            "/generate", content=b'{"prompt": ', headers={"content-type": "application/json"}
        )
        return str(response.status_code)
    except httpx.ReadTimeout:
        return "cut"


async def run_load(base_url: str, total: int, concurrency: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                outcomes[await one_request(client, rng)] += 1

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 400)
    return outcomes


def gauges(node: RunningServer) -> dict[str, float]:
    names = (
        "process_open_fds",
        "process_resident_memory_bytes",
        "gguf_appliance_event_loop_tasks",
        "gguf_appliance_busy_slots",
        "gguf_appliance_queue_depth",
    )
    return {name: node.metric(name) for name in names}


def wait_quiet(node: RunningServer, what: str, tasks: float, fds: float = math.inf) -> None:
    """Wait until no generation runs or waits, and tasks and fds are down to the bounds given.

    A generation whose client left ends, and its connection closes, a moment after the load.
    """

    def quiet() -> bool:
        now = gauges(node)
        return (
            now["gguf_appliance_busy_slots"] == 0
            and now["gguf_appliance_queue_depth"] == 0
            and now["gguf_appliance_event_loop_tasks"] <= tasks
            and now["process_open_fds"] <= fds
        )

    try:
        wait_until(quiet, 10, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {gauges(node)}") from None


def test_a_thousand_mixed_requests_leak_nothing(start_server: Any) -> None:
    node = start_server(n_slots=4, queue_size=64, n_ctx=1024)
    idle = gauges(node)
    asyncio.run(run_load(node.base_url, 100, 12, seed=1))  # warm up: caches, pools, arenas
    # The baseline is the node at rest again: as few tasks as before the warm-up.
    wait_quiet(node, "never at rest after the warm-up", idle["gguf_appliance_event_loop_tasks"])
    before = gauges(node)
    started = time.monotonic()
    outcomes = asyncio.run(run_load(node.base_url, 1000, 12, seed=2))
    elapsed = time.monotonic() - started
    wait_quiet(
        node,
        "slots, queue, tasks or fds never came back down after the load",
        tasks=before["gguf_appliance_event_loop_tasks"] + 2,
        fds=before["process_open_fds"] + 4,
    )
    after = gauges(node)
    assert sum(outcomes.values()) == 1000
    assert set(outcomes) <= {"200", "400", "cut"}, outcomes  # no 5xx, no 503 with this queue
    assert outcomes["cut"] > 100 and outcomes["400"] > 10
    assert after["gguf_appliance_busy_slots"] == 0
    assert after["gguf_appliance_queue_depth"] == 0
    assert after["gguf_appliance_event_loop_tasks"] <= before["gguf_appliance_event_loop_tasks"] + 2
    assert after["process_open_fds"] <= before["process_open_fds"] + 4
    grown = after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
    assert grown < 40 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"
    print(f"1000 requests in {elapsed:.1f} s: {dict(outcomes)}; RSS {grown / 2**20:+.1f} MiB")
