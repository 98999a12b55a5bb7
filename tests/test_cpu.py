from __future__ import annotations

import platform
from pathlib import Path

from gguf_appliance.cpu import build_repacked_types, read_cpu

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9J14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
"""

# An OCI A1 core (Ampere Altra: Neoverse N1) and an A2 core (AmpereOne), as Linux prints them.
N1_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""

AMPEREONE_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb \
paca pacg dcpodp flagm2 frint i8mm bf16 rng bti ecv
CPU implementer\t: 0xc0
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xac3
CPU revision\t: 1
"""

BINFMT_QEMU = """enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: POCF
offset 0
magic 7f454c460201010000000000000000000200b700
"""


def fake_proc(
    tmp_path: Path, cpuinfo: str, kernel_arch: str | None, binfmt: str | None = None
) -> Path:
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/fs/binfmt_misc").mkdir(parents=True)
    (proc / "cpuinfo").write_text(cpuinfo)
    if kernel_arch is not None:
        (proc / "sys/kernel/arch").write_text(kernel_arch + "\n")
    if binfmt is not None:
        (proc / "sys/fs/binfmt_misc/qemu-aarch64").write_text(binfmt)
    return proc


def test_arm_code_on_an_x86_kernel_is_emulation(tmp_path: Path) -> None:
    cpu = read_cpu(fake_proc(tmp_path, X86_CPUINFO, "x86_64"), machine="aarch64")
    assert cpu.emulation is not None
    assert "aarch64 code on a x86_64 kernel" in cpu.emulation


def test_x86_cpuinfo_under_arm_code_is_emulation_without_the_kernel_arch_file(
    tmp_path: Path,
) -> None:
    # Kernels before 6.1 have no /proc/sys/kernel/arch: /proc/cpuinfo still tells.
    cpu = read_cpu(fake_proc(tmp_path, X86_CPUINFO, None), machine="aarch64")
    assert cpu.emulation is not None
    assert "/proc/cpuinfo describes an x86 CPU" in cpu.emulation


def test_a_qemu_binfmt_handler_for_our_own_architecture_is_emulation(tmp_path: Path) -> None:
    # An emulator that shows an Arm /proc/cpuinfo: binfmt_misc still names it.
    proc = fake_proc(tmp_path, N1_CPUINFO, None, binfmt=BINFMT_QEMU)
    cpu = read_cpu(proc, machine="aarch64")
    assert cpu.emulation is not None
    assert "/usr/libexec/qemu-binfmt/aarch64-binfmt-P" in cpu.emulation


def test_a_disabled_binfmt_handler_is_not_emulation(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path, N1_CPUINFO, "aarch64", binfmt=BINFMT_QEMU.replace("enabled", "disabled")
    )
    assert read_cpu(proc, machine="aarch64").emulation is None


def test_neoverse_n1_repacks_for_dot_products(tmp_path: Path) -> None:
    cpu = read_cpu(fake_proc(tmp_path, N1_CPUINFO, "aarch64"), machine="aarch64")
    assert cpu.emulation is None
    assert cpu.model.startswith("Arm Neoverse N1")
    types = cpu.repacked_types()
    assert types["Q4_0"] == "4x4"
    assert types["Q4_K"] == "8x4"
    assert types["Q8_0"] == "4x4"
    assert "Q4_1" not in types


def test_ampereone_repacks_for_int8_matrix_multiply(tmp_path: Path) -> None:
    cpu = read_cpu(fake_proc(tmp_path, AMPEREONE_CPUINFO, "aarch64"), machine="aarch64")
    assert cpu.model.startswith("AmpereOne")
    types = cpu.repacked_types()
    assert types["Q4_0"] == "4x8"
    assert types["Q4_K"] == "8x8"
    assert types["IQ4_NL"] == "4x4"  # repack.cpp has no i8mm layout for it
    assert "Q4_1" not in types


def test_x86_repacks_with_avx2(tmp_path: Path) -> None:
    cpu = read_cpu(fake_proc(tmp_path, X86_CPUINFO, "x86_64"), machine="x86_64")
    assert cpu.emulation is None
    assert cpu.model == "AMD EPYC 9J14 96-Core Processor"
    assert cpu.repacked_types() == {
        "Q4_0": "8x8",
        "Q4_K": "8x8",
        "IQ4_NL": "8x8",
        "MXFP4": "8x8",
        "Q2_K": "8x8",
    }


def test_this_machine_is_not_emulated() -> None:
    # The test suite runs natively (the bench test's figures are real ones).
    cpu = read_cpu()
    assert cpu.machine == platform.machine()
    assert cpu.emulation is None
    assert cpu.cores >= 1
    assert cpu.logical >= cpu.cores


def test_an_arm_build_repacks_by_what_it_was_compiled_for() -> None:
    # llama_print_system_info of `make arm64-wheel`'s build (armv8.2-a+dotprod+fp16).
    dotprod = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1 |"
    assert build_repacked_types("arm", dotprod)["Q4_0"] == "4x4"
    assert build_repacked_types("arm", dotprod)["Q8_0"] == "4x4"
    i8mm = dotprod.replace("DOTPROD = 1 |", "DOTPROD = 1 | MATMUL_INT8 = 1 |")
    assert build_repacked_types("arm", i8mm)["Q4_0"] == "4x8"
    # Built for plain armv8-a: nothing, whatever the CPU can do.
    assert build_repacked_types("arm", "CPU : NEON = 1 | ARM_FMA = 1 | REPACK = 1 |") == {}
    assert build_repacked_types("arm", dotprod.replace("DOTPROD = 1", "DOTPROD = 0")) == {}


def test_an_x86_build_repacks_with_avx2() -> None:
    build = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | REPACK = 1 |"
    assert build_repacked_types("x86", build)["Q4_0"] == "8x8"
    assert build_repacked_types("x86", build)["Q2_K"] == "8x8"
    assert build_repacked_types("x86", "CPU : SSE3 = 1 | AVX = 1 | REPACK = 1 |") == {}
