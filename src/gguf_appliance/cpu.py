"""The CPU this process runs on: its architecture and SIMD features, whether it is emulated, and
which weight types llama.cpp repacks for it.

The repack table follows `ggml_repack_get_optimal_repack_type` in llama.cpp's
`ggml/src/ggml-cpu/repack.cpp` (the version vendored in llama-cpp-python 0.3.36). On Arm the
features are compile-time there (`__ARM_FEATURE_DOTPROD`, `__ARM_FEATURE_MATMUL_INT8`), so the
table says what a build for this CPU (`GGML_NATIVE=ON`, as cloud-init builds) repacks; what a
given build did repack is in llama.cpp's load log (see bench.py).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from .settings import physical_cores

_FAMILIES = {
    "x86_64": "x86",
    "amd64": "x86",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "arm",
    "arm64": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
}

# /proc/cpuinfo's "CPU implementer" and "CPU part" of the Arm cores OCI rents (Linux's
# arch/arm64/include/asm/cputype.h has the same numbers).
_ARM_PARTS = {
    ("0x41", "0xd0c"): "Arm Neoverse N1 (Ampere Altra: OCI A1)",
    ("0x41", "0xd40"): "Arm Neoverse V1",
    ("0x41", "0xd49"): "Arm Neoverse N2",
    ("0x41", "0xd4f"): "Arm Neoverse V2",
    ("0xc0", "0xac3"): "AmpereOne (OCI A2)",
    ("0xc0", "0xac4"): "AmpereOne A (AmpereOne M)",
}


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # what this process's code is built for (platform.machine())
    kernel_arch: str | None  # what the kernel runs on (/proc/sys/kernel/arch)
    model: str
    features: frozenset[str]  # x86 "flags" or Arm "Features" of /proc/cpuinfo
    cores: int
    logical: int
    emulation: str | None  # why this process runs emulated, or None

    @property
    def family(self) -> str:
        return _FAMILIES.get(self.machine.lower(), self.machine.lower())

    def repacked_types(self) -> dict[str, str]:
        """Weight type -> the interleaved layout llama.cpp repacks it into on this CPU."""
        return repacked_types(self.family, self.features)


def repacked_types(family: str, features: frozenset[str]) -> dict[str, str]:
    """The repack.cpp table (a weight's rows must also be a multiple of 4 or 8; every 2-D
    weight of a usual model is). Arm's 8x8 Q4_0 layout also needs 256-bit SVE vectors, which
    /proc/cpuinfo does not show; OCI's Ampere cores have no SVE (see docs/arm.md)."""
    types: dict[str, str] = {}
    if family == "x86":
        if "avx2" in features:
            types |= {"Q4_0": "8x8", "Q4_K": "8x8", "IQ4_NL": "8x8", "MXFP4": "8x8"}
        if "avx512f" in features:
            types["Q2_K"] = "8x8"
    elif family == "arm":
        # asimddp: the dot-product instructions (FEAT_DotProd); i8mm: int8 matrix multiply.
        if "asimddp" in features:
            types |= {
                "Q4_0": "4x4",
                "Q4_K": "8x4",
                "Q5_K": "8x4",
                "Q6_K": "8x4",
                "Q8_0": "4x4",
                "IQ4_NL": "4x4",
                "MXFP4": "4x4",
            }
        if "asimddp" in features and "i8mm" in features:
            types |= {"Q4_0": "4x8", "Q4_K": "8x8", "Q5_K": "8x8", "Q6_K": "8x8", "Q8_0": "4x8"}
    return types


# llama_print_system_info's names ("DOTPROD = 1 | ...") for the CPU features the table reads.
_BUILD_FEATURES = {
    "arm": {"DOTPROD": "asimddp", "MATMUL_INT8": "i8mm"},
    "x86": {"AVX2": "avx2", "AVX512": "avx512f"},
}


def build_repacked_types(family: str, build: str) -> dict[str, str]:
    """The repack table for what a llama.cpp build was compiled to use (`build` is
    llama_print_system_info's line). On Arm ggml tests these features at compile time, so this
    is what the build repacks on any CPU that runs it; under an emulator it is all there is to
    say, since /proc/cpuinfo there is not the emulated CPU's."""
    used = {name for name, value in re.findall(r"(\w+) = (\d+)", build) if value != "0"}
    names = _BUILD_FEATURES.get(family, {})
    return repacked_types(family, frozenset(flag for name, flag in names.items() if name in used))


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's fields (every core of an OCI shape is the same kind)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpuinfo_family(fields: dict[str, str]) -> str | None:
    if "vendor_id" in fields and "flags" in fields:
        return "x86"
    if "CPU implementer" in fields or "Features" in fields:
        return "arm"
    return None


def detect_emulation(
    machine: str, cpuinfo: str, kernel_arch: str | None, binfmt: Path
) -> str | None:
    """Why this process's figures would not be the machine's own, or None.

    Under qemu-user, uname (and platform.machine()) says the emulated architecture, but the
    kernel's own files still describe the real CPU, and binfmt_misc names the interpreter that
    runs this architecture's programs: a machine does not register one for its own.
    """
    family = _FAMILIES.get(machine.lower(), machine.lower())
    kernel_family = _FAMILIES.get(kernel_arch.lower(), kernel_arch.lower()) if kernel_arch else None
    if kernel_family is not None and kernel_family != family:
        return f"this is {machine} code on a {kernel_arch} kernel (an emulator such as qemu-user)"
    seen = _cpuinfo_family(_cpuinfo_fields(cpuinfo))
    if seen is not None and seen != family:
        return f"this is {machine} code, but /proc/cpuinfo describes an {seen} CPU (an emulator)"
    for name in (f"qemu-{machine}", f"qemu-{machine}-static"):
        entry = binfmt / name
        try:
            lines = entry.read_text().splitlines()
        except OSError:
            continue
        if lines and lines[0].strip() == "enabled":
            interpreter = next(
                (x.split(None, 1)[1] for x in lines if x.startswith("interpreter ")), "qemu"
            )
            return f"binfmt_misc runs {machine} programs through {interpreter} (qemu-user)"
    return None


def read_cpu(proc: Path = Path("/proc"), machine: str | None = None) -> CpuInfo:
    machine = machine or platform.machine()
    try:
        cpuinfo = (proc / "cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    try:
        kernel_arch: str | None = (proc / "sys/kernel/arch").read_text().strip() or None
    except OSError:
        kernel_arch = None  # kernels before 6.1 have no such file
    fields = _cpuinfo_fields(cpuinfo)
    features = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or ""
    part = (fields.get("CPU implementer", "").lower(), fields.get("CPU part", "").lower())
    if not model and part != ("", ""):
        model = _ARM_PARTS.get(part, f"Arm CPU (implementer {part[0]}, part {part[1]})")
    return CpuInfo(
        machine=machine,
        kernel_arch=kernel_arch,
        model=model or "unknown",
        features=features,
        cores=physical_cores(),
        logical=len(os.sched_getaffinity(0)),
        emulation=detect_emulation(machine, cpuinfo, kernel_arch, proc / "sys/fs/binfmt_misc"),
    )
