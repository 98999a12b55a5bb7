"""How decoding scales with the number of sequences in one batch: the data behind N_SLOTS.

A plain greedy loop over the low-level API (no server): read each sequence's prompt, then decode
one token for every sequence per step. Reports total and per-sequence tokens/s, median of the
rounds, the batch sizes alternating within each round.

    .venv/bin/python benchmarks/batch_sizes.py [--sizes 1,4,8,12,16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from gguf_appliance.llama import Batch, LlamaModel, SamplingParams
from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source

STEPS = 64


def rate(llm: LlamaModel, batch: Batch, sequences: int) -> float:
    prompts = [
        llm.chat_prompt([{"role": "user", "content": f"Write a long story about topic {i}."}])
        for i in range(sequences)
    ]
    samplers = [llm.new_sampler(SamplingParams(temperature=0.0)) for _ in prompts]
    token, position, index = {}, {}, {}
    for s, prompt in enumerate(prompts):  # one prompt at a time: all of them may not fit a batch
        llm.forget(s, 0)
        batch.clear()
        for i, t in enumerate(prompt):
            batch.add(t, i, s, i == len(prompt) - 1)
        llm.decode(batch)
        token[s], position[s] = llm.sample(samplers[s], batch.n - 1), len(prompt)
    started = time.perf_counter()
    for _ in range(STEPS):
        batch.clear()
        for s in range(sequences):
            index[s] = batch.add(token[s], position[s], s, True)
            position[s] += 1
        llm.decode(batch)
        for s in range(sequences):
            token[s] = llm.sample(samplers[s], index[s])
            llm.piece(token[s])
    elapsed = time.perf_counter() - started
    for sampler in samplers:
        llm.free_sampler(sampler)
    return sequences * STEPS / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8,12,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    n_seq = max(sizes)
    llm = LlamaModel(
        resolve_source(DEFAULT_MODEL),
        n_ctx=2048 * n_seq,
        n_seq=n_seq,
        n_batch=512,
        threads=args.threads,
    )
    batch = Batch(512 + n_seq)
    rates: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            rates[n].append(rate(llm, batch, n))
    print(f"{args.threads} threads, {STEPS} greedy steps, median of {args.rounds} rounds\n")
    print("| sequences | total tok/s | per sequence |")
    print("| ---: | ---: | ---: |")
    for n in sizes:
        total = statistics.median(rates[n])
        print(f"| {n} | {total:.1f} | {total / n:.1f} |")
    batch.free()
    llm.close()


if __name__ == "__main__":
    main()
