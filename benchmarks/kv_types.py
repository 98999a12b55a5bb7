"""KV cache types (the KV_CACHE_TYPE setting): memory per slot, decode rate, and answers.

For each type, a context of the node's default shape (8 slots of 2,048 tokens) on the same
model, all loaded side by side in this process and measured in interleaved rounds:

- memory: the cache's size as llama.cpp reports it when it allocates it, per slot;
- decode rate: 8 sequences that have each read a ~1,000-token prompt, then generate 64 tokens
  together (a long context is where the cache's type costs most), and one such sequence alone;
- answers: the greedy answers (64 tokens) to a fixed set of chat prompts, compared token by
  token with f16's: how many are identical, and where the others first differ.

    .venv/bin/python benchmarks/kv_types.py [--types f16,q8_0,q4_0] [--rounds 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from pathlib import Path
from typing import Any

from gguf_appliance.llama import Batch, LlamaModel, SamplingParams
from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
SLOTS, N_CTX = 8, 2048
KV_LINE = re.compile(r"llama_kv_cache: +size = +([\d.]+) MiB")
QUESTIONS = [
    "What is the capital of France, and why is it famous?",
    "Explain in three sentences how a rainbow forms.",
    "Write a short poem about the sea.",
    "List five fruits and their colours.",
    "How do I reverse a list in Python?",
    "What is 17 times 23? Show your working.",
    "Summarise the plot of Romeo and Juliet.",
    "Give three tips for a job interview.",
]
FILLER = (
    "The committee met on Tuesday to review the harbour's budget, the state of the old bridge, "
    "and the plan for the winter market. "
)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def load(model: Path, kv_type: str, threads: int) -> tuple[LlamaModel, float]:
    logger = logging.getLogger("gguf_appliance.llama")
    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        llm = LlamaModel(
            model,
            n_ctx=SLOTS * N_CTX,
            n_seq=SLOTS,
            n_batch=512,
            threads=threads,
            kv_type=kv_type,
        )
    finally:
        logger.removeHandler(handler)
    sizes = [float(m[1]) for m in map(KV_LINE.search, handler.lines) if m]
    return llm, sizes[0]


def read_prompts(llm: LlamaModel, prompt: list[int]) -> None:
    """Every sequence reads the long prompt once; the rates then decode after it."""
    batch = Batch(512 + SLOTS)
    try:
        for s in range(SLOTS):
            llm.forget(s, 0)
            for start in range(0, len(prompt), 512):
                batch.clear()
                for i, token in enumerate(prompt[start : start + 512], start=start):
                    batch.add(token, i, s, False)
                assert llm.decode(batch) == 0
    finally:
        batch.free()


def decode_rate(llm: LlamaModel, sequences: int, prompt: list[int], tokens: int = 64) -> float:
    """Greedy tokens/s of `sequences` decoded together after the prompt (then forgotten)."""
    batch = Batch(512 + SLOTS)
    samplers = [llm.new_sampler(SamplingParams(temperature=0.0)) for _ in range(sequences)]
    try:
        last = [prompt[-1]] * sequences
        index = [0] * sequences
        started = time.perf_counter()
        for step in range(tokens):
            batch.clear()
            for s in range(sequences):
                index[s] = batch.add(last[s], len(prompt) - 1 + step, s, True)
            assert llm.decode(batch) == 0
            for s in range(sequences):
                last[s] = llm.sample(samplers[s], index[s])
        elapsed = time.perf_counter() - started
        for s in range(sequences):
            llm.forget(s, len(prompt) - 1)
        return sequences * tokens / elapsed
    finally:
        for sampler in samplers:
            llm.free_sampler(sampler)
        batch.free()


def answer(llm: LlamaModel, question: str, tokens: int = 64) -> list[int]:
    batch = Batch(512)
    sampler = llm.new_sampler(SamplingParams(temperature=0.0))
    try:
        llm.forget(0, 0)
        prompt = llm.chat_prompt([{"role": "user", "content": question}])
        batch.clear()
        for i, token in enumerate(prompt):
            batch.add(token, i, 0, i == len(prompt) - 1)
        assert llm.decode(batch) == 0
        out = [llm.sample(sampler, batch.n - 1)]
        while len(out) < tokens and not llm.is_eog(out[-1]):
            batch.clear()
            batch.add(out[-1], len(prompt) + len(out) - 1, 0, True)
            assert llm.decode(batch) == 0
            out.append(llm.sample(sampler, 0))
        return out
    finally:
        llm.free_sampler(sampler)
        batch.free()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f16,q8_0,q5_1,q4_0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kv_types.json")
    args = parser.parse_args()
    model = args.model or resolve_source(DEFAULT_MODEL)
    types = args.types.split(",")
    assert types[0] == "f16", "answers are compared with the first type's: f16"
    models = {t: load(model, t, args.threads) for t in types}
    first = models[types[0]][0]
    long_prompt = first.text_prompt(FILLER * 40)[:1000]
    for llm, _ in models.values():
        read_prompts(llm, long_prompt[:-1])
    rates: dict[str, dict[int, list[float]]] = {t: {1: [], SLOTS: []} for t in types}
    for _ in range(args.rounds):
        for t in types:
            for n in (1, SLOTS):
                rates[t][n].append(decode_rate(models[t][0], n, long_prompt))
    answers = {t: [answer(models[t][0], q) for q in QUESTIONS] for t in types}  # in sequence 0
    results: dict[str, Any] = {"model": model.name, "slots": SLOTS, "n_ctx": N_CTX, "types": {}}
    for t in types:
        llm, size = models[t]
        same, diverged = 0, []
        for ours, ref in zip(answers[t], answers[types[0]], strict=True):
            if ours == ref:
                same += 1
            else:
                diverged.append(
                    next(
                        (i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b),
                        len(ours),
                    )
                )
        results["types"][t] = {
            "kv_mib": size,
            "per_slot_mib": size / SLOTS,
            "decode_1": statistics.median(rates[t][1]),
            "decode_8": statistics.median(rates[t][SLOTS]),
            "answers_same": same,
            "first_difference": diverged,
            "example": llm.detokenize(answers[t][0]),
        }
        llm.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    base = results["types"][types[0]]
    print(
        f"model {model.name}, {SLOTS} slots of {N_CTX} tokens, {args.threads} threads, "
        f"~1,000-token context, medians of {args.rounds} rounds\n"
    )
    print(
        "| KV cache type | KV MiB (per slot) | decode tok/s, 1 sequence | 8 sequences | "
        f"greedy answers identical to f16 (of {len(QUESTIONS)}) | first difference at token |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for t, r in results["types"].items():
        print(
            f"| {t} | {r['kv_mib']:.0f} ({r['per_slot_mib']:.1f}) | {r['decode_1']:.1f} "
            f"({r['decode_1'] / base['decode_1']:.2f}x) | {r['decode_8']:.1f} "
            f"({r['decode_8'] / base['decode_8']:.2f}x) | {r['answers_same']} | "
            f"{', '.join(map(str, r['first_difference'])) or '-'} |"
        )


if __name__ == "__main__":
    main()
