"""What one llama_decode costs by the shape of its batch (issue #18's levers), in this process.

- slot ids: one token for each of 4-8 sequences, by which sequence ids and in which order (with
  a KV cache per sequence llama.cpp makes one pass per run of consecutive ids);
- prompt chunks: a ~900-token prompt read in pieces of 32 to 512 tokens;
- drafts: k tokens of one sequence in one decode against one token (what verifying a
  speculative draft costs).

    .venv/bin/python benchmarks/decode_shapes.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from gguf_appliance.llama import Batch, LlamaModel
from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source
from peers import prompt as make_prompt  # this directory

ORDERS = ([0, 1, 2, 3], [0, 2, 4, 6], [0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0])
CHUNKS = (32, 64, 128, 256, 512)
DRAFTS = (1, 2, 3, 4, 6, 8)


def read(llm: LlamaModel, batch: Batch, seq: int, tokens: list[int], chunk: int = 512) -> None:
    for start in range(0, len(tokens), chunk):
        batch.clear()
        for i, token in enumerate(tokens[start : start + chunk], start=start):
            batch.add(token, i, seq, i == len(tokens) - 1)
        assert llm.decode(batch) == 0


def timed(llm: LlamaModel, batch: Batch) -> float:
    started = time.perf_counter()
    assert llm.decode(batch) == 0
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llm = LlamaModel(
        resolve_source(DEFAULT_MODEL),
        n_ctx=8 * 2048,
        n_seq=8,
        n_batch=512,
        threads=physical_cores(),
    )
    batch = Batch(600)
    short = llm.text_prompt("Once upon a time there was a dragon who lived by the sea. " * 3)
    for seq in range(8):
        read(llm, batch, seq, short)
    orders: dict[str, list[float]] = {}
    chunks: dict[int, list[float]] = {}
    drafts: dict[int, list[float]] = {}
    base = len(short)
    for r in range(args.rounds):
        for order in ORDERS:
            times = []
            for k in range(20):
                batch.clear()
                for seq in order:
                    batch.add(100 + k, base + k, seq, True)
                times.append(timed(llm, batch))
            for seq in order:
                llm.forget(seq, base)
            orders.setdefault(str(order), []).append(statistics.median(times))
        for chunk in CHUNKS:
            long = llm.text_prompt(make_prompt("long", f"{r}.{chunk}"))[:900]
            llm.forget(1, 0)
            started = time.perf_counter()
            read(llm, batch, 1, long, chunk)
            chunks.setdefault(chunk, []).append(time.perf_counter() - started)
        llm.forget(1, 0)  # sequence 1 back to the short prompt, for the next round
        read(llm, batch, 1, short)
        for k in DRAFTS:
            times = []
            for _ in range(20):
                batch.clear()
                for j in range(k):
                    batch.add(200 + j, base + j, 0, True)
                times.append(timed(llm, batch))
                llm.forget(0, base)
            drafts.setdefault(k, []).append(statistics.median(times))
    print(f"medians of {args.rounds} rounds\n\n| sequence ids, in batch order | ms per step |")
    print("| --- | ---: |")
    for order, values in orders.items():
        print(f"| {order} | {statistics.median(values) * 1000:.1f} |")
    print("\n| prompt chunk | 900 tokens read at |\n| ---: | ---: |")
    for chunk, values in chunks.items():
        print(f"| {chunk} | {900 / statistics.median(values):.0f} tok/s |")
    one = statistics.median(drafts[1])
    print("\n| tokens of one sequence in a decode | cost against one |\n| ---: | ---: |")
    for k, values in drafts.items():
        print(f"| {k} | {statistics.median(values) / one:.2f}x |")
    batch.free()
    llm.close()


if __name__ == "__main__":
    main()
