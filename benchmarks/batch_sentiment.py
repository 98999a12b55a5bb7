"""Batch sentiment over 1,000 short reviews: one node versus two nodes behind NGINX.

    .venv/bin/python benchmarks/batch_sentiment.py [--rows 1000] [--rounds 2]

Each round runs `gguf-appliance batch ... --task sentiment --target URL` (the real CLI, its own
process) against, in turn:

- one node (all cores: THREADS=2, 8 slots) behind NGINX, concurrency 8;
- two nodes (THREADS=1 each, 8 slots each) behind NGINX, concurrency 16;

with NGINX configured by deploy/local-pool.conf (least_conn, retries on 503), and, once, the
in-process engine (no HTTP) for reference. Both pools share this machine's cores: on one
machine the second node adds no CPU, so this measures what the balancer and the split cost or
gain; on OCI each node brings its own two OCPUs. Prints rows/s, tokens/s, accuracy against the
generated labels, and retries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "deploy"), str(REPO / "tests")]

from local_pool import CONFIG, NGINX, Node  # noqa: E402

from reviews import make_reviews  # noqa: E402


def render(run_dir: Path, listen: str, nodes: list[Node]) -> Path:
    """deploy/local-pool.conf with its three upstream servers replaced by `nodes`."""
    text = CONFIG.read_text()
    lines = [m for m in re.finditer(r"^\s*server @NODE_\d@(.*);$", text, flags=re.M)]
    params = lines[0].group(1)
    servers = "\n".join(f"        server {n.address}{params};" for n in nodes)
    text = text[: lines[0].start()] + servers + text[lines[-1].end() :]
    text = text.replace("@RUN_DIR@", str(run_dir)).replace("@LISTEN@", listen)
    conf = run_dir / "nginx.conf"
    conf.write_text(text)
    return conf


class Pool:
    def __init__(self, run_dir: Path, n_nodes: int, threads: int, port: int) -> None:
        self.run_dir = run_dir
        self.listen = f"127.0.0.1:{port}"
        self.nodes = [
            Node(
                f"127.0.0.{21 + i}:{port}",
                run_dir / f"node-{i}.log",
                {"threads": str(threads), "n_slots": "8", "queue_size": "64"},
            )
            for i in range(n_nodes)
        ]
        self.conf = render(run_dir, self.listen, self.nodes)
        self.nginx: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Pool:
        for node in self.nodes:
            node.start()
        self.run_dir.chmod(0o755)
        self.nginx = subprocess.Popen(
            [NGINX, "-p", str(self.run_dir), "-c", str(self.conf), "-g", "daemon off;"],
            stderr=subprocess.DEVNULL,
        )
        for node in self.nodes:
            node.wait_ready()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.stop()
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(10)


def run_batch(src: Path, out: Path, *args: str) -> dict[str, float]:
    env = {**os.environ, "GGUF_APPLIANCE_ENV_FILE": ""}
    command = [sys.executable, "-m", "gguf_appliance.cli", "batch", str(src), str(out)]
    result = subprocess.run(
        [*command, "--task", "sentiment", *args], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    summary: dict[str, float] = json.loads(result.stdout)
    return summary


def accuracy(out: Path, truth: dict[str, str]) -> float:
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return sum(line["result"] == truth[line["id"]] for line in lines) / len(truth)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    reviews = make_reviews(args.rows, seed=42)
    truth = {str(r["id"]): str(r["label"]) for r in reviews}
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        src = root / "reviews.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in reviews))
        warm = root / "warm.jsonl"
        warm.write_text("".join(json.dumps(r) + "\n" for r in reviews[:16]))
        setups = [
            ("1 node x 2 threads, NGINX, concurrency 8", 1, 2, 8),
            ("2 nodes x 1 thread, NGINX, concurrency 16", 2, 1, 16),
        ]
        for round_ in range(args.rounds):
            for name, n_nodes, threads, concurrency in setups:
                run_dir = root / f"pool-{round_}-{n_nodes}"
                run_dir.mkdir()
                with Pool(run_dir, n_nodes, threads, 18100 + round_ * 10 + n_nodes) as pool:
                    url = f"http://{pool.listen}"
                    run_batch(warm, run_dir / "warm-out.jsonl", "--target", url)
                    out = run_dir / "out.jsonl"
                    summary = run_batch(
                        src, out, "--target", url, "--concurrency", str(concurrency)
                    )
                summary["accuracy"] = accuracy(out, truth)
                results.setdefault(name, []).append(summary)
                print(f"round {round_ + 1}: {name}: {summary['rows_per_second']:.2f} rows/s")
        out = root / "inproc.jsonl"
        summary = run_batch(src, out)
        summary["accuracy"] = accuracy(out, truth)
        results["in-process engine (no HTTP), 8 slots"] = [summary]

    print(f"\n{args.rows} reviews, sentiment, median of {args.rounds} rounds\n")
    print("| setup | rows/s | tokens/s | accuracy | retries |")
    print("| --- | ---: | ---: | ---: | ---: |")
    medians = {}
    for name, runs in results.items():
        rows = statistics.median(r["rows_per_second"] for r in runs)
        medians[name] = rows
        tokens = statistics.median(r["tokens_per_second"] for r in runs)
        acc = statistics.median(r["accuracy"] for r in runs)
        retries = max(r["retries"] for r in runs)
        print(f"| {name} | {rows:.2f} | {tokens:.0f} | {acc:.2f} | {retries:.0f} |")
    one, two = (medians[name] for name, *_ in setups)
    print(f"\ntwo nodes / one node: {two / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
