"""`gguf-appliance bench` on the bundled model, with tiny settings: the table is what was
measured, and the advice follows from the table by the documented rules."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gguf_appliance.bench import (
    SLOTS_SHARE,
    THREADS_TIE,
    BenchOptions,
    BenchResult,
    Cell,
    advise,
    format_report,
    measure,
)
from gguf_appliance.cpu import read_cpu
from gguf_appliance.settings import DEFAULT_MODEL
from gguf_appliance.sources import resolve_source

TINY = [
    *("--threads", "1,2", "--sequences", "1,2"),
    *("--prompt-tokens", "16", "--gen-tokens", "8", "--rounds", "1"),
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "GGUF_APPLIANCE_ENV_FILE": ""}
    env.pop("GGUF_APPLIANCE_MODEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "gguf_appliance.cli", "bench", *TINY, "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(out.read_text())


def test_bench_table_shows_every_measured_cell(bench_run: tuple[str, dict[str, Any]]) -> None:
    stdout, result = bench_run
    cells = result["cells"]
    assert {(c["threads"], c["sequences"]) for c in cells} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", stdout, re.M)
    assert len(rows) == len(cells)
    for row, cell in zip(rows, cells, strict=True):
        assert cell["prompt_rate"] > 0 and cell["gen_rate"] > 0
        assert row == (
            str(cell["threads"]),
            str(cell["sequences"]),
            f"{cell['prompt_rate']:.1f}",
            f"{cell['gen_rate']:.1f}",
            f"{cell['gen_rate'] / cell['sequences']:.1f}",
        )
    assert result["cpu"]["emulation"] is None
    assert "meaningless" not in stdout


def test_bench_recommends_the_threads_and_slots_its_table_supports(
    bench_run: tuple[str, dict[str, Any]],
) -> None:
    stdout, result = bench_run
    cells = result["cells"]
    advice = {a["setting"]: a for a in result["advice"]}
    # Each thread count's rates as shares of the best at the same batch size, averaged.
    shares: dict[int, list[float]] = {}
    for n in (1, 2):
        row = [c for c in cells if c["sequences"] == n]
        for key in ("prompt_rate", "gen_rate"):
            best = max(c[key] for c in row)
            for c in row:
                shares.setdefault(c["threads"], []).append(c[key] / best)
    scores = {t: sum(v) / len(v) for t, v in shares.items()}
    good = [t for t, s in scores.items() if s >= max(scores.values()) * (1 - THREADS_TIE)]
    threads = int(advice["threads"]["value"])
    assert threads == min(good), (scores, advice["threads"])
    assert f"GGUF_APPLIANCE_THREADS={threads}  #" in stdout

    row = {c["sequences"]: c["gen_rate"] for c in cells if c["threads"] == threads}
    slots = int(advice["slots"]["value"])
    assert row[slots] >= SLOTS_SHARE * max(row.values())
    assert all(row[n] < SLOTS_SHARE * max(row.values()) for n in row if n < slots)
    assert f"GGUF_APPLIANCE_N_SLOTS={slots}  #" in stdout
    assert f"{row[slots]:.0f} tok/s in all" in advice["slots"]["reason"]


def test_bench_quantisation_advice_follows_what_llama_cpp_repacked(
    bench_run: tuple[str, dict[str, Any]],
) -> None:
    stdout, result = bench_run
    repacks = result["cpu"]["repacks"]  # what this CPU repacks, by repack.cpp
    # No CPU has a layout for Q4_1, and llama.cpp's load log says it repacked none.
    assert result["quantization"] == "Q4_1"
    assert next(iter(result["weight_types"])) == "Q4_1"
    assert "Q4_1" not in repacks and "Q4_1" not in result["repacked"]
    advice = next(a for a in result["advice"] if a["setting"] == "quantization")
    # The bundled file's Q4_1 weights are never repacked: a CPU that repacks Q4_0 (or Q4_K)
    # is told to prefer that file, one that repacks neither to keep it.
    expected = "Q4_0" if "Q4_0" in repacks else "Q4_K_M" if "Q4_K" in repacks else None
    assert advice["value"] == expected
    if expected:
        assert f"quantization: prefer {expected}" in stdout
        assert "Q4_1 weights are used as stored" in advice["reason"]


@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model requantised to Q4_0 with llama.cpp's own quantizer."""
    import llama_cpp as C

    out = tmp_path_factory.mktemp("q4_0") / "smollm2-q4_0.gguf"
    params = C.llama_model_quantize_default_params()
    params.ftype = C.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    source = str(resolve_source(DEFAULT_MODEL)).encode()
    assert C.llama_model_quantize(source, str(out).encode(), ctypes.byref(params)) == 0
    return out


def test_bench_sees_llama_cpp_repack_a_q4_0_file(q4_0_model: Path) -> None:
    options = BenchOptions(threads=(2,), sequences=(1,), prompt_tokens=8, gen_tokens=4, rounds=1)
    result = measure(q4_0_model, options)
    repacks = result.cpu.repacked_types()
    assert result.weight_types, "no 2-D weights read"
    assert ("Q4_0" in result.repacked) == ("Q4_0" in repacks)
    if "Q4_0" in repacks:
        assert result.repacked["Q4_0"] == repacks["Q4_0"]
    quant = result.advice[-1]
    assert quant.setting == "quantization"
    assert quant.value is None and quant.reason.startswith("keep Q4_0")
    assert ("repacked them at load" in quant.reason) == ("Q4_0" in repacks)


def test_bench_under_emulation_says_so_and_recommends_nothing() -> None:
    cpu = dataclasses.replace(read_cpu(), emulation="binfmt_misc runs aarch64 programs (qemu)")
    result = BenchResult(
        model=Path("m.gguf"),
        quantization="Q4_0",
        weight_types={"Q4_0": 1 << 20},
        repacked={},
        cpu=cpu,
        options=BenchOptions(threads=(1, 2), sequences=(1,)),
        cells=[Cell(1, 1, 50.0, 10.0), Cell(2, 1, 90.0, 18.0)],
    )
    assert advise(result) == []
    report = format_report(result)
    assert report.startswith("EMULATED: these figures are meaningless")
    assert "no recommendation" in report
    assert "GGUF_APPLIANCE_THREADS" not in report


def test_bench_under_qemu_does_not_say_the_cpu_repacks_nothing(tmp_path: Path) -> None:
    # qemu-user: aarch64 code reads the x86 host's /proc/cpuinfo, which has no Arm features;
    # the build (compiled with dot products) repacks all the same, as its load log showed.
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse2 avx avx2\n"
    )
    (proc / "sys/kernel/arch").write_text("x86_64\n")
    cpu = read_cpu(proc, machine="aarch64")
    assert cpu.emulation is not None
    build = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1 |"
    result = BenchResult(
        model=Path("m.gguf"),
        quantization="Q4_1",
        weight_types={"Q4_1": 63 << 20, "Q8_0": 29 << 20},
        repacked={"Q8_0": "4x4"},
        cpu=cpu,
        options=BenchOptions(threads=(1,), sequences=(1,)),
        cells=[Cell(1, 1, 2.6, 2.1)],
        build=build,
    )
    report = format_report(result)
    assert "repacks on this CPU: nothing" not in report
    assert "llama.cpp repacks on this CPU: unknown" in report
    assert "this build repacks, by what it was compiled for: Q4_0 (4x4), Q4_K (8x4)" in report
    assert "cpu: aarch64 under emulation" in report
    assert "(AMD EPYC) describes the host or the emulator" in report
    assert "repacked in this file: Q8_0 (4x4)" in report
    as_json = result.as_dict()["cpu"]
    assert as_json["repacks"] is None
    assert as_json["build_repacks"]["Q8_0"] == "4x4"
