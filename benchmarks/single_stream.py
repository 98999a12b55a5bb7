"""One 128-token streamed answer: gguf-appliance's /generate next to llama-cpp-python's API.

Both run the same model, prompt, threads and greedy sampling on this machine, alternating, so
noise hits both alike. The server runs in a child process (as in production); llama-cpp-python's
high-level `Llama.create_chat_completion(stream=True)` runs in this process.

    .venv/bin/python benchmarks/single_stream.py [--runs 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
from gguf_appliance.sources import resolve_source

MESSAGES = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rate(first: float, last: float, tokens: int) -> float:
    """Decode rate: tokens after the first, over the time from the first to the last."""
    return (tokens - 1) / (last - first)


def run_appliance(url: str, tokens: int) -> tuple[float, float, int]:
    body = {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    first = last = 0.0
    done: dict[str, object] = {}
    with httpx.stream("POST", url + "/generate", json=body, timeout=120) as response:
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                now = time.perf_counter()
                if event == "token":
                    first = first or now
                    last = now
                elif event == "done":
                    done = json.loads(line[5:])
    count = int(done["completion_tokens"])  # type: ignore[call-overload]
    return first - started, rate(first, last, count), count


def run_llama_cpp_python(llm: object, tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    reason = None
    for chunk in llm.create_chat_completion(  # type: ignore[attr-defined]
        messages=MESSAGES, max_tokens=tokens, temperature=0, stream=True
    ):
        choice = chunk["choices"][0]
        if choice["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
        reason = choice.get("finish_reason") or reason
    count = tokens if reason == "length" else count
    return first - started, rate(first, last, count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args()

    from llama_cpp import Llama

    model = resolve_source(DEFAULT_MODEL)
    port = free_port()
    env = {
        **os.environ,
        "GGUF_APPLIANCE_PORT": str(port),
        "GGUF_APPLIANCE_THREADS": str(args.threads),
        "GGUF_APPLIANCE_N_CTX": "4096",
        "GGUF_APPLIANCE_N_SLOTS": "1",
        "GGUF_APPLIANCE_ENV_FILE": "",
        "GGUF_APPLIANCE_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen([sys.executable, "-m", "gguf_appliance.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        llm = Llama(str(model), n_ctx=4096, n_threads=args.threads, n_batch=512, verbose=False)
        run_appliance(url, 16)  # warm both up
        run_llama_cpp_python(llm, 16)
        results: dict[str, list[tuple[float, float, int]]] = {"appliance": [], "llama": []}
        for _ in range(args.runs):
            results["appliance"].append(run_appliance(url, args.tokens))
            results["llama"].append(run_llama_cpp_python(llm, args.tokens))
    finally:
        server.terminate()
        server.wait(30)

    print(
        f"model {Path(model).name}, {args.threads} threads, {args.tokens} tokens, "
        f"{args.runs} runs each, medians"
    )
    print(f"{'':<46} {'tok/s':>7} {'first token':>12} {'tokens':>7}")
    names = {
        "appliance": "gguf-appliance POST /generate (SSE)",
        "llama": "llama-cpp-python Llama.create_chat_completion",
    }
    medians = {}
    for key, runs in results.items():
        ttft = statistics.median(r[0] for r in runs)
        tps = statistics.median(r[1] for r in runs)
        medians[key] = tps
        print(f"{names[key]:<46} {tps:>7.1f} {ttft * 1000:>10.0f}ms {runs[0][2]:>7}")
    print(f"ratio gguf-appliance / llama-cpp-python: {medians['appliance'] / medians['llama']:.2f}")


if __name__ == "__main__":
    main()
