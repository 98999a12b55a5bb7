"""gguf-appliance next to llama.cpp's own llama-server and llama-cpp-python's server.

The three servers are up side by side with the same model, threads, slots and context, and
every round runs every load on every server in turn, so the machine's drift hits all alike;
figures are medians over the rounds, ratios are medians of the rounds' ratios.

A load is a number of streams (1, 2, 4, 8 clients, each sending its next request as soon as its
last one ends) and a prompt shape: "short" (a one-line prompt, 128 greedy tokens) or "long" (a
~900-token document and a question, 64 greedy tokens: a RAG-like load). Every prompt is new and
differs from the first token on, so no server answers from a prompt cache. Streamed
`/v1/completions` over a bare asyncio socket (the load generator shares the 2 cores with the
servers, so it does as little as it can).

    make bench                     # builds llama-server first (make llama-server)
    .venv/bin/python benchmarks/peers.py --rounds 5 [--model PATH] [--only ours,llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
STREAMS = (1, 2, 4, 8)
SLOTS = 8
N_CTX = 2048  # per slot
SHAPES = {"short": 128, "long": 64}  # answer tokens
_TEXT = (
    "river stone harbour ledger copper signal orchard lantern valley engine market winter "
    "bridge archive quarry meadow beacon furnace compass timber glacier canal mirror forest "
    "station harvest anchor mill granite thunder garden tunnel island workshop candle "
    "factory summit orbit cellar vessel tower barley falcon saddle canyon velvet marble"
)
WORDS = _TEXT.split()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prompt(shape: str, label: str) -> str:
    """A new prompt, unique from its first words on (no server can reuse a cached prefix)."""
    if shape == "short":
        topic = random.Random(label).choice(WORDS)
        return f"Story {label}. Write a long story about a {topic}.\n\nOnce upon a time"
    rng = random.Random(label)
    sentences = []
    for _ in range(72):  # about 900 tokens of SmolLM2's vocabulary
        words = rng.choices(WORDS, k=rng.randint(8, 13))
        sentences.append(" ".join(words).capitalize() + ".")
    return (
        f"Report {label}.\n" + " ".join(sentences) + "\n\nWrite a long summary of the report "
        "above.\n\nSummary: The report"
    )


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            try:  # all of them list the model only once it is loaded
                models = httpx.get(self.url + "/v1/models", timeout=2)
                if models.status_code == 200 and models.json()["data"]:
                    return self
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start")

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Result:
    ttft: float
    tokens: int
    prompt_tokens: int


async def one_request(url: str, text: str, max_tokens: int) -> Result:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "m",
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (host.encode(), port.encode(), len(body))
        + body
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{url}: {status!r} {await reader.read(500)!r}")
    first = 0.0
    chunks, reason, usage = 0, None, None
    async for line in reader:  # chunked framing lines are skipped with everything not data:
        if not line.startswith(b"data: {"):
            continue
        data = json.loads(line[6:])
        usage = data.get("usage") or usage
        if not data.get("choices"):
            continue
        choice = data["choices"][0]
        if choice.get("text") or choice.get("finish_reason"):
            first = first or time.perf_counter()
            chunks += 1
        reason = choice.get("finish_reason") or reason
    writer.close()
    # An event may carry several tokens (gguf-appliance's STREAM_INTERVAL): count from usage;
    # llama_cpp.server sends none, and one token an event.
    if usage:
        tokens, prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    else:
        tokens, prompt_tokens = (max_tokens if reason == "length" else chunks), 0
    return Result(first - started, tokens, prompt_tokens)


async def run_load(url: str, shape: str, streams: int, label: str) -> tuple[list[Result], float]:
    """`streams` clients, each sending its share of the round's requests one after another."""
    per_client = 2 if shape == "short" or streams < 8 else 1
    started = time.perf_counter()

    async def client(c: int) -> list[Result]:
        return [
            await one_request(url, prompt(shape, f"{label}.{c}.{i}"), SHAPES[shape])
            for i in range(per_client)
        ]

    results = await asyncio.gather(*(client(c) for c in range(streams)))
    return [r for rs in results for r in rs], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Samples:
    aggregate: list[float] = field(default_factory=list)  # one per round
    ttft: list[float] = field(default_factory=list)  # every request
    ttft_p50: list[float] = field(default_factory=list)  # one per round
    prompt_tokens: list[int] = field(default_factory=list)


def measure(
    servers: list[Server], loads: list[tuple[str, int]], rounds: int
) -> dict[tuple[str, str, int], Samples]:
    for server in servers:  # warm-up: first calls allocate buffers
        asyncio.run(run_load(server.url, "short", 2, "warm-up"))
    samples = {(s.name, shape, n): Samples() for s in servers for shape, n in loads}
    for r in range(rounds):
        for shape, n in loads:
            for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                results, wall = asyncio.run(run_load(server.url, shape, n, f"{r}.{n}.{shape}"))
                sample = samples[server.name, shape, n]
                sample.aggregate.append(sum(x.tokens for x in results) / wall)
                sample.ttft.extend(x.ttft for x in results)
                sample.ttft_p50.append(statistics.median(x.ttft for x in results))
                sample.prompt_tokens.extend(x.prompt_tokens for x in results if x.prompt_tokens)
                print(
                    f"  round {r} {shape} x{n} {server.name}: {sample.aggregate[-1]:.1f} tok/s, "
                    f"ttft p50 {sample.ttft_p50[-1]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return samples


def summarise(
    samples: dict[tuple[str, str, int], Samples], names: list[str], loads: list[tuple[str, int]]
) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for shape, n in loads:
        row: dict[str, Any] = {}
        for name in names:
            s = samples[name, shape, n]
            row[name] = {
                "aggregate_tps": statistics.median(s.aggregate),
                "aggregate_runs": [round(a, 1) for a in s.aggregate],
                "ttft_p50": statistics.median(s.ttft),
                "ttft_p95": percentile(s.ttft, 0.95),
                "prompt_tokens": statistics.median(s.prompt_tokens) if s.prompt_tokens else None,
            }
        for name in names:
            if not name.startswith("gguf-appliance") or "llama-server" not in names:
                continue
            ours, theirs = samples[name, shape, n], samples["llama-server", shape, n]
            suffix = name[len("gguf-appliance") :]  # "" for the node as configured, or a variant
            row["ratio" + suffix] = statistics.median(
                a / b for a, b in zip(ours.aggregate, theirs.aggregate, strict=True)
            )
            row["ttft_p50_ratio" + suffix] = statistics.median(
                a / b for a, b in zip(ours.ttft_p50, theirs.ttft_p50, strict=True)
            )
        table[f"{shape} x{n}"] = row
    return table


def llama_cpp_server(python: str, model: Path, threads: str, log: Path | None = None) -> Server:
    """llama-cpp-python's own server on a free port: one request at a time, `N_CTX` tokens."""
    port = free_port()
    return Server(
        "llama_cpp.server",
        [
            python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--n_threads",
            threads,
            "--n_threads_batch",
            threads,
            "--n_ctx",
            str(N_CTX),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # By default a new request cuts off the stream in flight; queue them instead.
            "--interrupt_requests",
            "false",
        ],
        {},
        port,
        log=log,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the bundled model)")
    parser.add_argument(
        "--llama-server", type=Path, default=ROOT / "build/llama.cpp/bin/llama-server"
    )
    parser.add_argument("--baseline-python", default=str(ROOT / ".venv-baseline/bin/python"))
    parser.add_argument(
        "--only", help="comma-separated servers: gguf-appliance,llama-server,llama_cpp.server"
    )
    parser.add_argument("--shapes", default="short,long")
    parser.add_argument("--streams", default=",".join(map(str, STREAMS)))
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for gguf-appliance (a lever)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=VALUE[,NAME=VALUE]: one more gguf-appliance with these settings, side by side",
    )
    parser.add_argument("--server-args", default="", help="extra llama-server arguments")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    parser.add_argument("--logs", type=Path, help="a directory for the servers' logs")
    args = parser.parse_args()

    model = args.model or resolve_source(DEFAULT_MODEL)
    threads = str(args.threads)
    loads = [(s, int(n)) for s in args.shapes.split(",") for n in args.streams.split(",")]
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    def log(name: str) -> Path | None:
        return args.logs / f"{name}.log" if args.logs else None

    def appliance(name: str, env: list[str]) -> Server:
        port = free_port()
        settings = {
            "GGUF_APPLIANCE_MODEL": str(model),
            "GGUF_APPLIANCE_THREADS": threads,
            "GGUF_APPLIANCE_N_CTX": str(N_CTX),
            "GGUF_APPLIANCE_N_SLOTS": str(SLOTS),
            "GGUF_APPLIANCE_ENV_FILE": "",
            "GGUF_APPLIANCE_LOG_LEVEL": "warning",
            "GGUF_APPLIANCE_QUEUE_SIZE": "64",
            "GGUF_APPLIANCE_PORT": str(port),
            **dict(e.split("=", 1) for e in env),
        }
        command = [sys.executable, "-m", "gguf_appliance.cli", "serve"]
        filename = name.replace(" ", "_").replace("/", "_")  # a variant may name a path
        return Server(name, command, settings, port, log=log(filename))

    ours = appliance("gguf-appliance", args.env)
    variants = [appliance(f"gguf-appliance {v}", [*args.env, *v.split(",")]) for v in args.variant]
    port = free_port()
    server = Server(
        "llama-server",
        [
            str(args.llama_server),
            "-m",
            str(model),
            "-t",
            threads,
            "-np",
            str(SLOTS),
            "-c",
            str(N_CTX * SLOTS),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args.server_args.split(),
        ],
        {},
        port,
        log=log("llama-server"),
    )
    baseline = llama_cpp_server(args.baseline_python, model, threads, log("llama_cpp.server"))
    servers = [ours, *variants, server, baseline]
    if args.only:
        wanted = args.only.split(",")
        servers = [s for s in servers if s.name in wanted or s in variants]
    names = [s.name for s in servers]
    started = [s.__enter__() for s in servers]
    try:
        cpu_before = {s.name: s.cpu_seconds() for s in started}
        samples = measure(started, loads, args.rounds)
        cpu = {s.name: s.cpu_seconds() - cpu_before[s.name] for s in started}
        rss = {s.name: s.peak_rss_mb() for s in started}
    finally:
        for s in started:
            s.__exit__()
    tokens = {
        name: sum(sum(samples[name, shape, n].aggregate) for shape, n in loads) for name in names
    }
    results = {
        "model": model.name,
        "threads": args.threads,
        "slots": SLOTS,
        "n_ctx_per_slot": N_CTX,
        "rounds": args.rounds,
        "env": args.env,
        "server_args": args.server_args,
        "loads": summarise(samples, names, loads),
        "peak_rss_mb": rss,
        "cpu_seconds": cpu,
        "generated_tokens_hint": tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results, names))


def report(r: dict[str, Any], names: list[str]) -> str:
    lines = [
        f"model {r['model']}, {r['threads']} threads, {r['slots']} slots of {r['n_ctx_per_slot']}"
        f" tokens, medians of {r['rounds']} interleaved rounds"
        + (f", gguf-appliance {' '.join(r['env'])}" if r["env"] else ""),
        "",
        "| load | " + " | ".join(f"{n} tok/s" for n in names) + " | ours / llama-server | "
        "first token p50 / p95: " + " / ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | --- |",
    ]
    for load, row in r["loads"].items():
        ratio = " / ".join(f"{v:.2f}x" for k, v in row.items() if k.startswith("ratio"))
        ttft = "; ".join(f"{row[n]['ttft_p50']:.2f} / {row[n]['ttft_p95']:.2f} s" for n in names)
        rates = " | ".join(f"{row[n]['aggregate_tps']:.1f}" for n in names)
        lines.append(f"| {load} | {rates} | {ratio} | {ttft} |")
    lines.append("")
    lines.append("peak RSS: " + ", ".join(f"{n} {r['peak_rss_mb'][n]:.0f} MB" for n in names))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
