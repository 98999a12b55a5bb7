"""How decoding scales with the number of sequences in one batch: the data behind N_SLOTS.

The concurrency benchmark's reference loop (greedy, the low-level API, no server): read each
sequence's prompt, then time decoding one token for every sequence per step. Reports total and
per-sequence tokens/s, median of the rounds, the batch sizes alternating within each round.

    .venv/bin/python benchmarks/batch_sizes.py [--sizes 1,4,8,12,16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

from concurrency import ReferenceLoop
from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source

STEPS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8,12,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    loop = ReferenceLoop(resolve_source(DEFAULT_MODEL), args.threads, max_sequences=max(sizes))
    rates: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            rates[n].append(loop.rate(n, STEPS))
    loop.close()
    print(f"{args.threads} threads, {STEPS} greedy steps, median of {args.rounds} rounds\n")
    print("| sequences | total tok/s | per sequence |")
    print("| ---: | ---: | ---: |")
    for n in sizes:
        total = statistics.median(rates[n])
        print(f"| {n} | {total:.1f} | {total / n:.1f} |")


if __name__ == "__main__":
    main()
