"""Does OpenBLAS help? llama-cpp-python built with and without it, same source, same model.

Builds llama-cpp-python twice into two venvs (plain `-DGGML_NATIVE=ON`, and with
`-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS`; needs Debian's libopenblas-dev), then measures
prompt processing (one 512-token batch) and generation (128 single-token steps) through the
low-level API, the two builds alternating, 5 runs each. cloud-init.yaml builds with OpenBLAS only
if this shows it helps.

    .venv/bin/python benchmarks/openblas.py          # about 15 minutes on 2 cores (two builds)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILDS = {
    "native": "-DGGML_NATIVE=ON",
    "openblas": "-DGGML_NATIVE=ON -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS",
}

# Runs inside each build's venv: prints {"pp512": tok/s, "tg128": tok/s} for one run.
PROBE = r"""
import ctypes, json, sys, time
import llama_cpp as C
quiet = C.llama_log_callback(lambda *a: None)
C.llama_log_set(quiet, ctypes.c_void_p(0))
C.llama_backend_init()
model = C.llama_model_load_from_file(sys.argv[1].encode(), C.llama_model_default_params())
p = C.llama_context_default_params()
p.n_ctx, p.n_batch, p.n_ubatch = 1024, 512, 512
p.n_threads = p.n_threads_batch = int(sys.argv[2])
ctx = C.llama_init_from_model(model, p)
vocab = C.llama_model_get_vocab(model)
batch = C.llama_batch_init(512, 0, 1)
def fill(tokens, start):
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
    batch.n_tokens = len(tokens)
prompt = [(i * 7919) % 30000 + 100 for i in range(512)]
mem = C.llama_get_memory(ctx)
fill(prompt[:8], 0); C.llama_decode(ctx, batch)  # warm-up
C.llama_memory_clear(mem, True)
fill(prompt, 0)
t = time.perf_counter(); C.llama_decode(ctx, batch); pp = 512 / (time.perf_counter() - t)
t = time.perf_counter()
for step in range(128):
    fill([prompt[step]], 512 + step); C.llama_decode(ctx, batch)
tg = 128 / (time.perf_counter() - t)
print(json.dumps({"pp512": pp, "tg128": tg}))
"""


def build(name: str, cmake_args: str) -> Path:
    venv = ROOT / f".venv-bench-{name}"
    python = venv / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        env = {
            **os.environ,
            "CMAKE_ARGS": cmake_args,
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        }
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-cache-dir",
                "llama-cpp-python==0.3.36",
            ],
            check=True,
            env=env,
        )
    return python


def main() -> None:
    from gguf_appliance.settings import DEFAULT_MODEL, physical_cores
    from gguf_appliance.sources import resolve_source

    model = resolve_source(DEFAULT_MODEL)
    threads = str(physical_cores())
    pythons = {name: build(name, args) for name, args in BUILDS.items()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in BUILDS}
    for _ in range(5):
        for name, python in pythons.items():
            out = subprocess.run(
                [str(python), "-c", PROBE, str(model), threads],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model {model.name}, {threads} threads, median of 5 alternating runs")
    print("| build | prompt processing, 512 tokens (tok/s) | generation, 128 tokens (tok/s) |")
    print("| --- | ---: | ---: |")
    medians = {}
    for name, results in runs.items():
        pp = statistics.median(r["pp512"] for r in results)
        tg = statistics.median(r["tg128"] for r in results)
        medians[name] = (pp, tg)
        print(f"| {name} | {pp:.1f} | {tg:.1f} |")
    ratio = medians["openblas"][0] / medians["native"][0]
    print(f"OpenBLAS / native, prompt processing: {ratio:.2f}")


if __name__ == "__main__":
    main()
