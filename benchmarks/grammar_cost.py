"""What a grammar costs a request now that it runs in a worker process.

One in-process engine on the bundled model; rounds alternate a plain answer, an answer held to
any JSON object (`response_format: json_object`) and one held to a small JSON schema, greedy,
one request at a time, so noise hits all three alike. Reported: the decode rate (tokens after
the first over the time since the first) and the time to load the grammar (check, worker round
trip, first mask), medians of the rounds. A second line runs the same with 4 requests at once.

    .venv/bin/python benchmarks/grammar_cost.py [--rounds 5] [--tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from gguf_appliance.engine import DoneEvent, Engine, EngineConfig, GenerationParams, TokenEvent
from gguf_appliance.grammar import Constraint
from gguf_appliance.llama import SamplingParams
from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "colours": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "colours"],
}
CASES: dict[str, Constraint | None] = {
    "plain": None,
    "json_object": Constraint.json_object(),
    "json_schema": Constraint.json_schema(SCHEMA),
}


async def answer(engine: Engine, prompt: list[int], grammar: Constraint | None, tokens: int) -> Any:
    params = GenerationParams(
        max_tokens=tokens, sampling=SamplingParams(temperature=0, grammar=grammar)
    )
    started = time.perf_counter()
    loaded = None
    if grammar is not None:
        compiled = await engine.prepare_grammar(grammar)
        loaded = time.perf_counter() - started
    else:
        compiled = None
    first = last = 0.0
    done: DoneEvent | None = None
    async for event in engine.submit(prompt, params, timeout=300, grammar=compiled).events():
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            first = first or now
            last = now
        elif isinstance(event, DoneEvent):
            done = event
        else:
            raise event.error
    assert done is not None
    rate = (done.completion_tokens - 1) / (last - first) if last > first else 0.0
    return rate, loaded, done.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    config = EngineConfig(
        n_ctx=2048,
        n_slots=4,
        n_batch=512,
        threads=physical_cores(),
        queue_size=8,
        max_tokens_cap=2048,
        retry_after=1,
        prefill_chunk=64,
        reuse_prefix=True,
        stream_interval=0.0,
    )
    engine = Engine(config)
    engine.load(resolve_source(DEFAULT_MODEL))
    assert engine.model is not None
    prompts = [
        engine.model.chat_prompt(
            [
                {
                    "role": "user",
                    "content": f"Describe person number {i} as JSON: name, age, colours.",
                }
            ]
        )
        for i in range(4)
    ]

    async def run() -> None:
        await answer(engine, prompts[0], CASES["json_object"], 8)  # warm the worker
        for streams in (1, 4):
            rates: dict[str, list[float]] = {name: [] for name in CASES}
            loads: dict[str, list[float]] = {name: [] for name in CASES}
            for _ in range(args.rounds):
                for name, grammar in CASES.items():
                    results = await asyncio.gather(
                        *(answer(engine, prompts[i], grammar, args.tokens) for i in range(streams))
                    )
                    rates[name].append(sum(r for r, _, _ in results))
                    loads[name].extend(x for _, x, _ in results if x is not None)
            cells = []
            for name in CASES:
                cell = f"{name} {statistics.median(rates[name]):.1f} tok/s"
                if loads[name]:
                    cell += f" (load {statistics.median(loads[name]) * 1000:.0f} ms)"
                cells.append(cell)
            print(f"{streams} stream(s): " + " | ".join(cells))

    try:
        asyncio.run(run())
    finally:
        engine.close()


if __name__ == "__main__":
    main()
