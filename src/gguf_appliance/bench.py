"""`gguf-appliance bench`: how fast this node reads prompts and generates, and the settings that
follow.

For each thread count and each number of sequences decoded together, it reads a prompt of
`prompt_tokens` into every sequence (one batch for all of them, split at n_batch), then
generates `gen_tokens` for every sequence, one token each per decode step, sampled greedily and
turned into text as the scheduler does. Rates count the tokens of every sequence. The cells run
`rounds` times, interleaved, and each keeps its best run: another program on the machine can
only make a run slower.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cpu import CpuInfo, build_repacked_types, read_cpu
from .errors import ModelError
from .llama import Batch, LlamaModel, SamplingParams, build_features

# The score of a thread count within this fraction of the best counts as a tie, and the fewer
# threads win it: a thread left over serves NGINX and the HTTP side.
THREADS_TIE = 0.03
# Slots: the fewest sequences per batch whose total generation rate is this share of the best.
SLOTS_SHARE = 0.90

# Files of the same model, of about the same size and quality, whose weights are of a type
# llama.cpp may repack: the file type to look for and the weight type it is made of.
_ALTERNATIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "Q4_1": (("Q4_0", "Q4_0"), ("Q4_K_M", "Q4_K")),
    "Q5_0": (("Q5_K_M", "Q5_K"),),
    "Q5_1": (("Q5_K_M", "Q5_K"),),
    "F16": (("Q8_0", "Q8_0"),),
    "BF16": (("Q8_0", "Q8_0"),),
}

_PROMPT_TEXT = (
    "A small language model runs on a virtual machine with two Arm cores. It reads the prompt, "
    "then writes its answer one token at a time, and every token needs a pass over all of the "
    "weights. "
)


@dataclass(frozen=True)
class BenchOptions:
    threads: tuple[int, ...]
    sequences: tuple[int, ...]
    prompt_tokens: int = 64
    gen_tokens: int = 32
    rounds: int = 2


@dataclass(frozen=True)
class Cell:
    threads: int
    sequences: int
    prompt_rate: float  # prompt tokens read per second, all sequences together
    gen_rate: float  # tokens generated per second, all sequences together


@dataclass(frozen=True)
class Advice:
    setting: str  # threads, slots or quantization
    value: str | None  # None: keep what there is
    reason: str


@dataclass
class BenchResult:
    model: Path
    quantization: str
    weight_types: dict[str, int]  # ggml type -> bytes of the model's 2-D weights
    repacked: dict[str, str]  # ggml type -> layout, as llama.cpp's load log said
    cpu: CpuInfo
    options: BenchOptions
    cells: list[Cell] = field(default_factory=list)
    build: str = ""  # what this llama.cpp build uses of the CPU (llama_print_system_info)
    load_average: float = 0.0
    seconds: float = 0.0
    advice: list[Advice] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        cpu = asdict(self.cpu)
        cpu["features"] = sorted(self.cpu.features)
        # Under an emulator /proc/cpuinfo is not the emulated CPU's: what it would repack is
        # unknown; what this build repacks follows from what it was compiled for.
        cpu["repacks"] = None if self.cpu.emulation else self.cpu.repacked_types()
        cpu["build_repacks"] = build_repacked_types(self.cpu.family, self.build)
        return {
            "model": str(self.model),
            "quantization": self.quantization,
            "weight_types": self.weight_types,
            "repacked": self.repacked,
            "cpu": cpu,
            "options": asdict(self.options),
            "cells": [asdict(c) for c in self.cells],
            "build": self.build,
            "load_average": self.load_average,
            "seconds": round(self.seconds, 1),
            "advice": [asdict(a) for a in self.advice],
        }


def default_threads(cores: int) -> tuple[int, ...]:
    """Thread counts around the core count: half, one less, all, one more."""
    return tuple(sorted({max(1, cores // 2), max(1, cores - 1), cores, cores + 1}))


def default_sequences(slots: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the node's slots, and the slots themselves."""
    counts = {slots}
    n = 1
    while n < slots:
        counts.add(n)
        n *= 2
    return tuple(sorted(counts))


def weight_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    sizes: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        if len(tensor.shape) == 2:
            name = tensor.tensor_type.name
            sizes[name] = sizes.get(name, 0) + int(tensor.n_bytes)
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


_REPACK_LINE = re.compile(r"repack tensor \S+ with (\w+?)_(\d+x\d+)")


@contextmanager
def _load_log() -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs (its repack lines are debug lines)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("gguf_appliance.llama")
    handler = Collect(logging.DEBUG)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the debug lines are for this function, not the console
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _Runner:
    def __init__(self, path: Path, options: BenchOptions) -> None:
        self.options = options
        n_max = max(options.sequences)
        per_sequence = -(-(options.prompt_tokens + options.gen_tokens + 8) // 256) * 256
        with _load_log() as lines:
            self.llm = LlamaModel(
                path,
                n_ctx=n_max * per_sequence,
                n_seq=n_max,
                n_batch=512,
                threads=options.threads[0],
            )
        self.repacked: dict[str, str] = {}
        for line in lines:
            match = _REPACK_LINE.search(line)
            if match:
                self.repacked[match[1].upper()] = match[2]
        self.batch = Batch(max(512, n_max))
        text = self.llm.text_prompt(_PROMPT_TEXT * 4)
        self.prompt = (text * (options.prompt_tokens // len(text) + 1))[: options.prompt_tokens]

    def _decode(self) -> None:
        if self.llm.decode(self.batch) != 0:
            raise ModelError("llama_decode failed during the benchmark (out of memory?)")

    def run(self, threads: int, sequences: int) -> tuple[float, float]:
        """(prompt tokens/s, generated tokens/s), all sequences together."""
        llm, batch, prompt = self.llm, self.batch, self.prompt
        llm.set_threads(threads)
        seqs = range(sequences)
        for s in range(max(self.options.sequences)):
            llm.forget(s, 0)
        samplers = [llm.new_sampler(SamplingParams(temperature=0.0)) for _ in seqs]
        token = [0] * sequences
        try:
            started = time.perf_counter()
            pending = [(s, i) for s in seqs for i in range(len(prompt))]
            for start in range(0, len(pending), self.llm.n_batch):
                batch.clear()
                last = {}
                for s, i in pending[start : start + self.llm.n_batch]:
                    index = batch.add(prompt[i], i, s, i == len(prompt) - 1)
                    if i == len(prompt) - 1:
                        last[s] = index
                self._decode()
                for s, index in last.items():
                    token[s] = llm.sample(samplers[s], index)
            read = time.perf_counter() - started
            index_of = [0] * sequences
            started = time.perf_counter()
            for step in range(self.options.gen_tokens):
                batch.clear()
                for s in seqs:
                    index_of[s] = batch.add(token[s], len(prompt) + step, s, True)
                self._decode()
                for s in seqs:
                    token[s] = llm.sample(samplers[s], index_of[s])
                    llm.piece(token[s])
            generated = time.perf_counter() - started
        finally:
            for sampler in samplers:
                llm.free_sampler(sampler)
        n = len(seqs)
        return n * len(prompt) / read, n * self.options.gen_tokens / generated

    def close(self) -> None:
        self.batch.free()
        self.llm.close()


def measure(path: Path, options: BenchOptions, cpu: CpuInfo | None = None) -> BenchResult:
    from .gguf_file import inspect_gguf

    began = time.monotonic()
    result = BenchResult(
        model=path,
        quantization=inspect_gguf(path).quantization,
        weight_types=weight_types(path),
        repacked={},
        cpu=cpu or read_cpu(),
        options=options,
        load_average=os.getloadavg()[0],
    )
    runner = _Runner(path, options)
    result.build = build_features()
    try:
        result.repacked = runner.repacked
        runner.run(options.threads[0], 1)  # warm-up: the weights' pages come in from disk
        best: dict[tuple[int, int], tuple[float, float]] = {}
        for _ in range(options.rounds):
            for threads in options.threads:
                for n in options.sequences:
                    prompt, gen = runner.run(threads, n)
                    before = best.get((threads, n), (0.0, 0.0))
                    best[threads, n] = (max(before[0], prompt), max(before[1], gen))
    finally:
        runner.close()
    result.cells = [Cell(t, n, p, g) for (t, n), (p, g) in sorted(best.items())]
    result.seconds = time.monotonic() - began
    result.advice = advise(result)
    return result


def advise(result: BenchResult) -> list[Advice]:
    """Threads, slots and quantisation for this node; none from an emulated CPU's figures."""
    if result.cpu.emulation is not None or not result.cells:
        return []
    threads = recommend_threads(result.cells)
    return [
        threads,
        recommend_slots(result.cells, int(threads.value or 1)),
        recommend_quantization(
            result.quantization, result.weight_types, result.repacked, result.cpu
        ),
    ]


def thread_scores(cells: list[Cell]) -> dict[int, float]:
    """Each thread count's rates as a share of the best at the same batch, averaged over both
    rates and every batch size measured."""
    shares: dict[int, list[float]] = {}
    for n in {c.sequences for c in cells}:
        row = [c for c in cells if c.sequences == n]
        best_prompt = max(c.prompt_rate for c in row)
        best_gen = max(c.gen_rate for c in row)
        for c in row:
            shares.setdefault(c.threads, []).append(c.prompt_rate / best_prompt)
            shares.setdefault(c.threads, []).append(c.gen_rate / best_gen)
    return {t: sum(v) / len(v) for t, v in sorted(shares.items())}


def recommend_threads(cells: list[Cell]) -> Advice:
    scores = thread_scores(cells)
    top = max(scores.values())
    threads = min(t for t, s in scores.items() if s >= top * (1 - THREADS_TIE))
    others = ", ".join(f"{t}: {s:.0%}" for t, s in scores.items() if t != threads)
    reason = f"{scores[threads]:.0%} of the best rates on average over the table"
    if others:
        reason += f" (other thread counts: {others})"
    return Advice("threads", str(threads), reason)


def recommend_slots(cells: list[Cell], threads: int) -> Advice:
    row = sorted((c for c in cells if c.threads == threads), key=lambda c: c.sequences)
    best = max(row, key=lambda c: c.gen_rate)
    chosen = next(c for c in row if c.gen_rate >= SLOTS_SHARE * best.gen_rate)
    reason = (
        f"{chosen.sequences} sequences per batch generate {chosen.gen_rate:.0f} tok/s in all "
        f"({chosen.gen_rate / chosen.sequences:.0f} per stream) with {threads} threads"
    )
    if chosen is not best:
        reason += (
            f", {chosen.gen_rate / best.gen_rate:.0%} of the most measured ({best.gen_rate:.0f}"
            f" at {best.sequences}): more slots would split about the same speed among more"
            " streams"
        )
    if chosen is row[-1] and len(row) > 1:
        reason += "; the total still grew at the largest batch measured: try more --sequences"
    return Advice("slots", str(chosen.sequences), reason)


def recommend_quantization(
    quantization: str, types: dict[str, int], repacked: dict[str, str], cpu: CpuInfo
) -> Advice:
    """Whether another file of the same model suits this CPU better, from which weight types
    llama.cpp repacks here (cpu.repacked_types) and which it did repack (the load log)."""
    expected = cpu.repacked_types()
    quantized = {t: n for t, n in types.items() if t not in ("F32",)}
    main = next(iter(quantized), "")
    build_note = ""
    if main in expected and main not in repacked:
        build_note = (
            f"; this build of llama.cpp did not repack the {main} weights, though it has a layout "
            "for them on this CPU: build llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=ON on "
            "the node"
        )
    if main in repacked or main in expected:
        layout = repacked.get(main) or expected[main]
        return Advice(
            "quantization",
            None,
            f"keep {quantization}: llama.cpp has a {layout} layout for its {main} weights on "
            f"this CPU{build_note or ' and repacked them at load'}",
        )
    if not expected:
        return Advice(
            "quantization",
            None,
            f"keep {quantization}: llama.cpp repacks no weight type on this CPU ({cpu.machine} "
            "without the dot-product or AVX2 instructions)",
        )
    better = [name for name, kind in _ALTERNATIVES.get(main, ()) if kind in expected]
    if not better:
        return Advice(
            "quantization",
            None,
            f"keep {quantization}: its {main} weights are not repacked here, and no file type of "
            f"about its size is either (this CPU repacks {', '.join(expected)})",
        )
    kinds = ", ".join(
        f"{kind} into {expected[kind]}" for name, kind in _ALTERNATIVES[main] if name in better
    )
    return Advice(
        "quantization",
        better[0],
        f"prefer a {' or '.join(better)} file of the same model: this file's {main} weights are "
        f"used as stored, while llama.cpp repacks {kinds} blocks at load for this CPU's "
        "integer dot-product instructions; compare with `gguf-appliance bench --model "
        "OTHER.gguf`",
    )


def format_report(result: BenchResult) -> str:
    cpu, opts = result.cpu, result.options
    lines = []
    if cpu.emulation:
        lines.append(f"EMULATED: these figures are meaningless for this machine: {cpu.emulation}")
    lines.append(
        f"model: {result.model.name} ({result.quantization}; weights: "
        + ", ".join(f"{t} {n / 2**20:.0f} MiB" for t, n in result.weight_types.items())
        + ")"
    )
    if cpu.emulation:
        # /proc/cpuinfo here is the host's (or the emulator's), not the emulated CPU's: its
        # name and features say nothing of what this code would run on.
        built = build_repacked_types(cpu.family, result.build)
        lines += [
            f"cpu: {cpu.machine} under emulation, {cpu.cores} cores ({cpu.logical} logical); "
            f"/proc/cpuinfo here ({cpu.model}) describes the host or the emulator, not a CPU "
            "that runs this code",
            f"llama.cpp build: {result.build or 'unknown'}",
            "llama.cpp repacks on this CPU: unknown (the CPU features read under emulation are "
            "not the emulated CPU's); this build repacks, by what it was compiled for: "
            + (", ".join(f"{t} ({lay})" for t, lay in built.items()) or "nothing"),
        ]
    else:
        lines += [
            f"cpu: {cpu.model}, {cpu.machine}, {cpu.cores} cores ({cpu.logical} logical)",
            f"llama.cpp build: {result.build or 'unknown'}",
            "llama.cpp repacks on this CPU: "
            + (", ".join(f"{t} ({lay})" for t, lay in cpu.repacked_types().items()) or "nothing"),
        ]
    lines += [
        "repacked in this file: "
        + (", ".join(f"{t} ({lay})" for t, lay in result.repacked.items()) or "nothing"),
        f"{opts.prompt_tokens}-token prompt and {opts.gen_tokens} generated tokens per sequence,"
        f" best of {opts.rounds} rounds, {result.seconds:.0f} s",
    ]
    if result.load_average > 0.5:
        lines.append(
            f"note: the load average was {result.load_average:.1f} at the start: another "
            "program used the CPU, so the rates may be low"
        )
    lines += [
        "",
        "| threads | sequences | prompt tok/s | generated tok/s | per sequence |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in result.cells:
        lines.append(
            f"| {c.threads} | {c.sequences} | {c.prompt_rate:.1f} | {c.gen_rate:.1f} | "
            f"{c.gen_rate / c.sequences:.1f} |"
        )
    lines.append("")
    if cpu.emulation:
        lines.append("no recommendation: the rates of an emulated CPU say nothing about a real one")
        return "\n".join(lines)
    lines.append("recommended:")
    names = {"threads": "GGUF_APPLIANCE_THREADS", "slots": "GGUF_APPLIANCE_N_SLOTS"}
    for advice in result.advice:
        if advice.setting in names:
            lines.append(f"  {names[advice.setting]}={advice.value}  # {advice.reason}")
        else:
            what = "keep this file" if advice.value is None else f"prefer {advice.value}"
            lines.append(f"  quantization: {what}  # {advice.reason}")
    return "\n".join(lines)
