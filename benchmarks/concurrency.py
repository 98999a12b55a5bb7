"""Concurrent streams: gguf-appliance next to llama-cpp-python's own server, in one invocation.

Same model, threads and prompts; greedy 128-token streamed chat completions through the `/v1`
API of each server, at 1, 2, 4 and 8 concurrent clients. Reports aggregate and per-stream
tokens/s, time to first token p50/p95 and peak RSS; the single-sequence decode rate of a plain
low-level loop (the reference limit); and a three-turn chat's time to first token with and
without prompt-prefix reuse. The servers run one at a time, each in its own process.

    make bench          # or: .venv/bin/python benchmarks/concurrency.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf_appliance.gguf_file import inspect_gguf
from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source
from peers import Server, free_port, llama_cpp_server, percentile  # this directory

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a dragon", "the sea", "a robot", "a village", "the moon", "a cat", "a river", "a clock"]
CONCURRENCY = (1, 2, 4, 8)
N_CTX = 2048  # per stream


@dataclass
class Stream:
    ttft: float
    tokens: int
    first: float
    last: float


async def one_stream(
    url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[Stream, str]:
    """One streamed chat completion over a bare asyncio socket.

    The load generator shares the 2 cores with the server, so it does as little as it can:
    no HTTP client library, one JSON parse per event.
    """
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "m",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{url}: {status!r}")
    first = last = 0.0
    chunks, reason, text, used = 0, None, [], None
    async for line in reader:  # chunked framing lines are skipped with everything not data:
        if not line.startswith(b"data: {"):
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            used = data["usage"]["completion_tokens"]
        if not data["choices"]:
            continue
        choice = data["choices"][0]
        piece = choice["delta"].get("content")
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            chunks += 1
            text.append(piece)
        reason = choice.get("finish_reason") or reason
    writer.close()
    # An event may carry several tokens (gguf-appliance's STREAM_INTERVAL): count from usage,
    # which llama_cpp.server does not send; its events are one token each.
    tokens = used if used is not None else max_tokens if reason == "length" else chunks
    return Stream(first - started, tokens, first - started, last - started), "".join(text)


async def concurrent_round(url: str, streams: int, label: str) -> tuple[list[Stream], float]:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            one_stream(
                url,
                [
                    {
                        "role": "user",
                        "content": f"Story {label}: write a long story about {TOPICS[i]}.",
                    }
                ],
                128,
            )
            for i in range(streams)
        )
    )
    wall = time.perf_counter() - started
    return [s for s, _ in results], wall


def measure_concurrency(
    servers: list[Server], rounds: int, reference: ReferenceLoop
) -> dict[str, dict[int, Any]]:
    """Every round runs every concurrency on each server in turn, and the reference loop once,
    so drift in the machine's speed hits all alike; ratios are taken within a round.
    """
    for server in servers:
        asyncio.run(concurrent_round(server.url, 2, "warm-up"))
    samples: dict[tuple[str, int], dict[str, list[float]]] = {
        (s.name, c): {"aggregate": [], "per_stream": [], "decode": [], "ttft": []}
        for s in servers
        for c in CONCURRENCY
    }
    references, references8 = [], []
    for r in range(rounds):
        references.append(reference.rate(1))
        references8.append(reference.rate(max(CONCURRENCY)))
        for c in CONCURRENCY:
            for server in servers:
                streams, wall = asyncio.run(concurrent_round(server.url, c, f"{r}.{c}"))
                sample = samples[server.name, c]
                sample["aggregate"].append(sum(s.tokens for s in streams) / wall)
                sample["per_stream"].extend(s.tokens / s.last for s in streams)
                # After the first token: the stream's decode rate, as the reference measures it.
                sample["decode"].extend((s.tokens - 1) / (s.last - s.first) for s in streams)
                sample["ttft"].extend(s.ttft for s in streams)
    table: dict[str, dict[int, Any]] = {s.name: {} for s in servers}
    for server in servers:
        for c in CONCURRENCY:
            sample = samples[server.name, c]
            one = samples[server.name, 1]
            table[server.name][c] = {
                "aggregate_tps": statistics.median(sample["aggregate"]),
                "per_stream_tps": statistics.median(sample["per_stream"]),
                "decode_tps": statistics.median(sample["decode"]),
                "ttft_p50": percentile(sample["ttft"], 0.5),
                "ttft_p95": percentile(sample["ttft"], 0.95),
                # Within each round: against one stream, and (one stream) against the reference.
                "of_one_stream": statistics.median(
                    a / b for a, b in zip(sample["aggregate"], one["aggregate"], strict=True)
                ),
            }
            print(f"  {server.name} x{c}: {table[server.name][c]}", file=sys.stderr)
        table[server.name][1]["of_reference"] = statistics.median(
            d / ref for d, ref in zip(samples[server.name, 1]["decode"], references, strict=True)
        )
    for server in servers:  # 8 streams' decoding against 8 sequences decoded in a plain loop
        table[server.name][max(CONCURRENCY)]["of_reference"] = statistics.median(
            statistics.median(d) * max(CONCURRENCY) / ref
            for d, ref in zip(
                _chunks(samples[server.name, max(CONCURRENCY)]["decode"], max(CONCURRENCY)),
                references8,
                strict=True,
            )
        )
    table["reference"] = {1: statistics.median(references), 8: statistics.median(references8)}
    table["reference_ratio"] = {
        8: statistics.median(a / b for a, b in zip(references8, references, strict=True))
    }
    print(f"  reference x1: {references}; x8: {references8}", file=sys.stderr)
    return table


def _chunks(values: list[float], size: int) -> list[list[float]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def measure_chat(servers: list[Server], runs: int = 3) -> dict[str, list[dict[str, float]]]:
    """A three-turn chat: each turn sends the whole history; time to first token per turn."""

    async def chat(server: Server, run: int) -> list[float]:
        messages: list[dict[str, str]] = []
        ttfts = []
        questions = [
            f"Tell me story number {run} about a lighthouse keeper.",
            "What happened next?",
            "How does the story end?",
        ]
        for question in questions:
            messages.append({"role": "user", "content": question})
            stream, answer = await one_stream(server.url, messages, 96)
            messages.append({"role": "assistant", "content": answer})
            ttfts.append(stream.ttft)
        return ttfts

    results: dict[str, list[list[float]]] = {s.name: [] for s in servers}
    for run in range(runs):
        for server in servers:
            results[server.name].append(asyncio.run(chat(server, run)))
    return {
        name: [{"ttft": statistics.median(r[t] for r in runs_)} for t in range(3)]
        for name, runs_ in results.items()
    }


class ReferenceLoop:
    """Greedy decoding through the low-level API in a plain loop, no server: the limit.

    One sequence is the limit a single stream is held to; 8 sequences decoded together in one
    batch are the limit for 8 streams. Only decoding is timed (prompts are read first).
    """

    def __init__(self, model: Path, threads: int, max_sequences: int = max(CONCURRENCY)) -> None:
        from gguf_appliance.llama import Batch, LlamaModel

        self.llm = LlamaModel(
            model, n_ctx=N_CTX * max_sequences, n_seq=max_sequences, n_batch=512, threads=threads
        )
        self.batch = Batch(512 + max_sequences)
        self.prompts = [
            self.llm.chat_prompt(
                [{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]} ({i})."}]
            )
            for i in range(max_sequences)
        ]

    def rate(self, sequences: int = 1, tokens: int = 128) -> float:
        from gguf_appliance.llama import SamplingParams

        llm, batch = self.llm, self.batch
        seqs = range(sequences)
        samplers = [llm.new_sampler(SamplingParams(temperature=0.0)) for _ in seqs]
        next_token, position, index = {}, {}, {}
        for s in seqs:  # one prompt at a time: all of them may not fit one batch
            llm.forget(s, 0)
            batch.clear()
            prompt = self.prompts[s]
            for i, token in enumerate(prompt):
                batch.add(token, i, s, i == len(prompt) - 1)
            llm.decode(batch)
            next_token[s], position[s] = llm.sample(samplers[s], batch.n - 1), len(prompt)
        started = time.perf_counter()
        for _ in range(tokens):
            batch.clear()
            for s in seqs:
                index[s] = batch.add(next_token[s], position[s], s, True)
                position[s] += 1
            llm.decode(batch)
            for s in seqs:
                next_token[s] = llm.sample(samplers[s], index[s])  # llama_sampler_sample
                llm.piece(next_token[s])
        elapsed = time.perf_counter() - started
        for sampler in samplers:
            llm.free_sampler(sampler)
        return sequences * tokens / elapsed

    def close(self) -> None:
        self.batch.free()
        self.llm.close()


def kv_cache_mb(model: Path, tokens: int) -> float:
    from gguf import GGUFReader

    reader = GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()

    def value(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].contents())

    head_dim = value("embedding_length") // value("attention.head_count")
    per_token = (
        value("block_count") * value("attention.head_count_kv") * head_dim * 2 * 2
    )  # K, V f16
    return per_token * tokens / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--slots", type=int, default=8, help="gguf-appliance's n_slots")
    parser.add_argument("--baseline-python", default=str(ROOT / ".venv-baseline/bin/python"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/concurrency.json")
    args = parser.parse_args()

    model = resolve_source(DEFAULT_MODEL)
    info = inspect_gguf(model)
    threads = str(args.threads)
    ours_env = {
        "GGUF_APPLIANCE_THREADS": threads,
        "GGUF_APPLIANCE_N_CTX": str(N_CTX),
        "GGUF_APPLIANCE_N_SLOTS": str(args.slots),
        "GGUF_APPLIANCE_ENV_FILE": "",
        "GGUF_APPLIANCE_LOG_LEVEL": "warning",
        "GGUF_APPLIANCE_QUEUE_SIZE": "64",
    }

    def ours(name: str, **extra: str) -> Server:
        port = free_port()
        return Server(
            name,
            [sys.executable, "-m", "gguf_appliance.cli", "serve"],
            {**ours_env, "GGUF_APPLIANCE_PORT": str(port), **extra},
            port,
        )

    baseline = llama_cpp_server(args.baseline_python, model, threads)
    results: dict[str, Any] = {
        "model": model.name,
        "model_mb": info.file_size / 2**20,
        "threads": args.threads,
        "slots": args.slots,
        "rounds": args.rounds,
    }
    reference = ReferenceLoop(model, args.threads)
    with (
        baseline,
        ours("gguf-appliance") as appliance,
        ours("every-token", GGUF_APPLIANCE_STREAM_INTERVAL="0") as every_token,
        ours("no-reuse", GGUF_APPLIANCE_REUSE_PREFIX="false") as no_reuse,
    ):
        table = measure_concurrency([baseline, appliance, every_token], args.rounds, reference)
        results["reference_tps"] = table["reference"][1]
        results["reference8_tps"] = table["reference"][8]
        results["reference8_ratio"] = table["reference_ratio"][8]
        results["baseline"], results["ours"] = table[baseline.name], table[appliance.name]
        results["ours_every_token"] = table[every_token.name]
        chats = measure_chat([baseline, appliance, no_reuse])
        results["baseline_chat"] = chats[baseline.name]
        results["ours_chat"] = chats[appliance.name]
        results["ours_chat_no_reuse"] = chats[no_reuse.name]
        results["baseline_rss_mb"] = baseline.peak_rss_mb()
        results["ours_rss_mb"] = appliance.peak_rss_mb()
    reference.close()
    results["kv_mb"] = kv_cache_mb(model, N_CTX * args.slots)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))


def report(r: dict[str, Any]) -> str:
    def row(table: dict[Any, Any], c: int) -> dict[str, float]:
        return dict(table[c] if c in table else table[str(c)])

    ours, base, every = r["ours"], r["baseline"], r.get("ours_every_token")
    one, one8 = row(ours, 1), row(ours, 8)
    lines = [
        f"model {r['model']} ({r['model_mb']:.0f} MB), {r['threads']} threads, gguf-appliance "
        f"n_slots={r['slots']}, n_ctx={N_CTX} per stream, 128-token greedy streams, "
        f"median of {r['rounds']} rounds",
        "",
        "| streams | gguf-appliance aggregate tok/s | per stream: decode / end to end | "
        "TTFT p50 / p95 | llama_cpp.server aggregate tok/s | per stream: decode / end to end | "
        "TTFT p50 / p95 | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in CONCURRENCY:
        o, b = row(ours, c), row(base, c)
        lines.append(
            f"| {c} | {o['aggregate_tps']:.1f} | {o['decode_tps']:.1f} / "
            f"{o['per_stream_tps']:.1f} | {o['ttft_p50']:.2f} / {o['ttft_p95']:.2f} s | "
            f"{b['aggregate_tps']:.1f} | {b['decode_tps']:.1f} / {b['per_stream_tps']:.1f} | "
            f"{b['ttft_p50']:.2f} / {b['ttft_p95']:.2f} s | "
            f"{o['aggregate_tps'] / b['aggregate_tps']:.2f}x |"
        )
    lines += [
        "",
        f"- reference: low-level single-sequence loop {r['reference_tps']:.1f} tok/s "
        f"(run in the same rounds); one gguf-appliance stream decodes at "
        f"{one['of_reference']:.0%} of it (median of the rounds' ratios), "
        f"{one['per_stream_tps'] / r['reference_tps']:.0%} end to end (its first token included)",
        f"- 8 streams: aggregate {one8['aggregate_tps']:.1f} tok/s = "
        f"{one8['of_one_stream']:.2f}x one stream (median of the rounds' ratios); "
        f"TTFT p50 {one8['ttft_p50']:.2f} s",
        f"- reference for 8: the plain loop decoding 8 sequences in one batch "
        f"{r['reference8_tps']:.1f} tok/s = {r['reference8_ratio']:.2f}x its one sequence; "
        f"8 gguf-appliance streams decode at {one8['of_reference']:.0%} of it",
        f"- peak RSS: gguf-appliance {r['ours_rss_mb']:.0f} MB (model {r['model_mb']:.0f} MB + "
        f"KV {r['kv_mb']:.0f} MB + {r['ours_rss_mb'] - r['model_mb'] - r['kv_mb']:.0f} MB); "
        f"llama_cpp.server {r['baseline_rss_mb']:.0f} MB",
    ]
    if every:
        lines += [
            "",
            "| streams | an event per token (STREAM_INTERVAL=0): aggregate tok/s | "
            "decode per stream | TTFT p50 |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for c in CONCURRENCY:
            e = row(every, c)
            lines.append(
                f"| {c} | {e['aggregate_tps']:.1f} | {e['decode_tps']:.1f} | "
                f"{e['ttft_p50']:.2f} s |"
            )
        lines.append(
            f"- one stream, an event per token: {row(every, 1)['of_reference']:.0%} of the "
            "reference"
        )
    lines += [
        "",
        "| chat turn | TTFT with prefix reuse | without | llama_cpp.server |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t in range(3):
        lines.append(
            f"| {t + 1} | {r['ours_chat'][t]['ttft']:.3f} s | "
            f"{r['ours_chat_no_reuse'][t]['ttft']:.3f} s | {r['baseline_chat'][t]['ttft']:.3f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
