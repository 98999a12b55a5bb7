"""Boot an arm64 Debian 12 node under qemu-user emulation with our cloud-init.yaml, and check
that it ends up serving through NGINX on port 80.

`make arm64-boot` runs this as root. It is the boot test (tests_boot/test_boot.py) for arm64:

1. registers qemu-aarch64-static with binfmt_misc (flag F, so the container's programs find
   their interpreter) if it is not, as `make arm64-run` does;
2. builds a Debian 12 arm64 root with debootstrap (the boot test's package list: systemd,
   cloud-init, NGINX, the build tools cloud-init would install anyway), cached in
   build/arm64-boot/rootfs-base; the second stage runs emulated;
3. copies it, puts cloud-init.yaml (from HEAD) in it as NoCloud user data, with three changes
   that only point at local files: the model is the bundled one (a file, not a Hugging Face
   download), the package is a wheel of HEAD, and pip gets `--find-links` to the cross-built
   llama-cpp-python wheel (build/arm64-wheels, `make arm64-wheel`) and this sandbox's CA;
4. boots it with `systemd-nspawn --boot` (it shares the host's network, as the boot test does:
   ports 80 and 8000 must be free) and waits for /health/ready through NGINX on port 80; then a
   request without a key is refused, a streamed /generate and a /v1 chat with a JSON schema are
   answered, the llama-cpp-python in the node is the cross-built wheel (not a compile), and after
   `kill -9` systemd brings the node back;
5. powers the container off (`systemctl poweroff` inside) and prints the times: end to end,
   and boot to ready split by the journal into boot, cloud-init's pip install and the node's
   start.

Two lines of the units' sandbox are turned off in the container by a drop-in, because qemu-user
cannot set them up (QEMU_DROP_IN below says which and why); a real Arm node runs them.

Correctness only: every figure is qemu's speed, not an Arm CPU's. The whole boot holds
/tmp/cpu.lock (the lock flock(1) takes), as the x86 boot test does, since both use ports 80 and
8000; building the root holds it only for its emulated second stage.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arm64_emulated import HOST_CA, MIRROR, WHEEL, cpu_lock, ensure_binfmt

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "arm64-boot"
BASE = WORK / "rootfs-base"
MACHINE = WORK / "node"
# The boot test's list (tests_boot/test_boot.py): what cloud-init would install is there
# already, so a run does not download and unpack it (emulated) each time.
PACKAGES = (
    "systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates,cloud-init,python3-venv,"
    "python3-dev,python3-pip,build-essential,cmake,git,nginx,python3-cffi-backend"
)
# What qemu-user cannot do for the emulated systemd, measured here (Debian 12's qemu 7.2,
# systemd 252): with PrivateIPC= the unit fails at step NAMESPACE ("Failed to set up IPC
# namespacing: Input/output error"), with PrivateUsers= at step USER ("Failed to set up user
# namespacing: Invalid argument": unshare(CLONE_NEWUSER) needs a single-threaded process, and
# qemu-user always runs a thread of its own). A drop-in beside the units turns just these two
# off, in the container only; the rest of the units' sandbox is applied as written.
QEMU_DROP_IN = """\
# arm64 boot under qemu-user only (deploy/arm64_boot.py): namespaces qemu-user cannot set up.
[Service]
PrivateIPC=no
PrivateUsers=no
"""
BASE_URL = "http://127.0.0.1:80"
PORTS = (80, 8000)  # NGINX, and the node behind it, on the host's network

times: dict[str, float] = {}


def say(message: str) -> None:
    print(f"[arm64-boot] {message}", flush=True)


def timed(step: str, started: float) -> None:
    times[step] = time.monotonic() - started
    say(f"{step}: {times[step]:.1f} s")


def ensure_base() -> None:
    stamp = BASE / ".debootstrapped"
    if stamp.exists():
        say(f"arm64 root: cached in {BASE.relative_to(REPO)}")
        return
    tmp = WORK / "rootfs-base-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    first = [
        "debootstrap",
        "--foreign",
        "--arch=arm64",
        "--variant=minbase",
        f"--include={PACKAGES}",
        "bookworm",
        str(tmp),
        MIRROR,
    ]
    with cpu_lock("debootstrap first stage"):
        started = time.monotonic()
        subprocess.run(first, check=True, timeout=1800)
        timed("debootstrap, first stage (download, unpack)", started)
    with cpu_lock("debootstrap second stage"):
        started = time.monotonic()
        second = ["chroot", str(tmp), "/debootstrap/debootstrap", "--second-stage"]
        subprocess.run(second, check=True, timeout=3600)
        timed("debootstrap, second stage (emulated)", started)
    stamp_in_tmp = tmp / ".debootstrapped"
    stamp_in_tmp.touch()
    if BASE.exists():
        shutil.rmtree(BASE)
    tmp.rename(BASE)


def head_wheel(dist: Path) -> Path:
    """gguf-appliance as a wheel of HEAD: others' edits in progress stay out of the node."""
    with tempfile.TemporaryDirectory() as src:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), src],
            check=True,
        )
    return next(dist.glob("gguf_appliance-*.whl"))


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"cloud-init.yaml has changed: {old!r} is not in it once")
    return text.replace(old, new)


def user_data(model: Path, package: Path) -> str:
    """cloud-init.yaml of HEAD, pointed at the files bound into the container."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", "HEAD:cloud-init.yaml"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    config = yaml.safe_load(source)
    files = {entry["path"]: entry for entry in config["write_files"]}
    settings = files["/etc/gguf-appliance/appliance.env"]
    settings["content"] = re.sub(
        r"^GGUF_APPLIANCE_MODEL=.*$",
        f"GGUF_APPLIANCE_MODEL=/srv/model/{model.name}",
        settings["content"],
        count=1,
        flags=re.M,
    )
    bootstrap = files["/etc/gguf-appliance/bootstrap.env"]
    text = replace_once(
        bootstrap["content"],
        "GGUF_APPLIANCE_PACKAGE=gguf-appliance==0.1.0",
        f"GGUF_APPLIANCE_PACKAGE=/srv/dist/{package.name}",
    )
    # pip prefers a wheel to the sdist of the same version: the pinned llama-cpp-python comes
    # from the cross-built wheel, so nothing is compiled. The CA: this sandbox reaches PyPI
    # through a TLS proxy.
    bootstrap["content"] = replace_once(
        text, "PIP_EXTRA=", 'PIP_EXTRA="--cert /srv/host-ca.crt --find-links /srv/arm64-wheels"'
    )
    return "#cloud-config\n" + str(yaml.safe_dump(config, sort_keys=False))


def bundled_model() -> Path:
    out = subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            "-c",
            "from gguf_appliance.settings import DEFAULT_MODEL;"
            "from gguf_appliance.sources import resolve_source;"
            "print(resolve_source(DEFAULT_MODEL))",
        ],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GGUF_APPLIANCE_")},
    ).stdout
    return Path(out.strip().splitlines()[-1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
        return False


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if check():
                return
        time.sleep(every)
    raise TimeoutError(what)


def in_container(init_pid: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "-t", str(init_pid), "-m", "-u", "-i", "-n", "-p", "--", *command],
        text=True,
        capture_output=True,
        timeout=300,
    )


def journal_time(init_pid: int, unit: str, message: str) -> float | None:
    """When the journal first logged a line of the unit containing message (epoch seconds)."""
    out = in_container(
        init_pid,
        "journalctl",
        "-b",
        "-u",
        unit,
        "-o",
        "json",
        "--no-pager",
        "--output-fields",
        "MESSAGE",
    ).stdout
    for line in out.splitlines():
        entry = json.loads(line)
        if message in str(entry.get("MESSAGE", "")):
            return int(entry["__REALTIME_TIMESTAMP"]) / 1e6
    return None


def new_machine(model: Path, package: Path) -> None:
    """A fresh copy of the base root with the NoCloud seed (disk work: no CPU lock)."""
    started = time.monotonic()
    if MACHINE.exists():
        shutil.rmtree(MACHINE)
    subprocess.run(["cp", "-a", "--reflink=auto", str(BASE), str(MACHINE)], check=True)
    seed = MACHINE / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True)
    (seed / "user-data").write_text(user_data(model, package))
    (seed / "meta-data").write_text("instance-id: gguf-arm64-boot\nlocal-hostname: arm1\n")
    (MACHINE / "etc/cloud/cloud.cfg.d/99-datasource.cfg").write_text(
        "datasource_list: [NoCloud, None]\n"
    )
    for unit in (
        "gguf-appliance.service",
        "gguf-appliance-fetch.service",
        "gguf-appliance-secrets.service",
        "gguf-appliance-oci-metrics.service",
    ):
        drop_in = MACHINE / "etc/systemd/system" / f"{unit}.d"
        drop_in.mkdir(parents=True)
        (drop_in / "qemu-user.conf").write_text(QEMU_DROP_IN)
    timed("copy of the root and the seed", started)


def power_off(nspawn: subprocess.Popen[bytes], init_pid: int | None) -> None:
    """systemctl poweroff inside. Not SIGTERM to nspawn: it sends the container's init
    SIGRTMIN+3 (halt), which reaches the emulated systemd as another real-time signal (qemu-user
    keeps some for itself) and put it in rescue mode here."""
    started = time.monotonic()
    if init_pid is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            in_container(init_pid, "systemctl", "poweroff")
    try:
        nspawn.wait(180)
    except subprocess.TimeoutExpired:
        say("the container did not power off in 180 s: killing systemd-nspawn")
        nspawn.kill()
        nspawn.wait(30)
    timed("poweroff", started)


@contextlib.contextmanager
def booted(model: Path, package: Path, log: Path) -> Iterator[int]:
    """The container, booted; yields the PID of its init. Powered off at the end."""
    with open(log, "w") as out:
        nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(MACHINE),
                "--boot",
                "--register=no",
                "--keep-unit",
                f"--bind-ro={package.parent}:/srv/dist",
                f"--bind-ro={model.parent}:/srv/model",
                f"--bind-ro={WHEEL.parent}:/srv/arm64-wheels",
                f"--bind-ro={HOST_CA}:/srv/host-ca.crt",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        say(f"systemd-nspawn PID {nspawn.pid}; console in {log.relative_to(REPO)}")
        init_pid = None
        try:

            def container_init() -> str:
                found = subprocess.run(
                    ["pgrep", "-P", str(nspawn.pid)], text=True, capture_output=True
                )
                return found.stdout.strip()

            wait_for(container_init, 60, "no container init", every=0.5)
            init_pid = int(container_init().split()[0])
            yield init_pid
        finally:
            power_off(nspawn, init_pid)


def check_node(init_pid: int, booted_at: float) -> None:
    ready = f"{BASE_URL}/health/ready"
    try:
        wait_for(lambda: httpx.get(ready, timeout=5).status_code == 200, 2400, "never ready")
    except TimeoutError:
        print(in_container(init_pid, "cloud-init", "status", "--long").stdout)
        print(in_container(init_pid, "journalctl", "-b", "--no-pager", "-n", "200").stdout)
        raise
    timed("boot to ready (nspawn start to /health/ready on port 80)", booted_at)

    arch = in_container(init_pid, "uname", "-m").stdout.strip()
    assert arch == "aarch64", arch
    say(f"in the container: uname -m = {arch}")
    assert "<html" in httpx.get(f"{BASE_URL}/", timeout=30).text.lower()

    # The cross-built wheel, not a compile: its shared library is in the node's venv byte for
    # byte, and pip recorded the wheel's tag.
    with zipfile.ZipFile(WHEEL) as wheel:
        lib = "llama_cpp/lib/libggml-cpu.so"
        ours = hashlib.sha256(wheel.read(lib)).hexdigest()
    site = in_container(
        init_pid,
        "/opt/gguf-appliance/bin/python",
        "-c",
        "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))",
    )
    assert site.returncode == 0, site.stderr
    theirs = in_container(init_pid, "sha256sum", f"{site.stdout.strip()}/lib/libggml-cpu.so")
    assert theirs.stdout.split()[0] == ours, (theirs.stdout, ours)
    say("llama-cpp-python in the node is the cross-built wheel (libggml-cpu.so sha256 equal)")

    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    generate = f"{BASE_URL}/generate"
    assert httpx.post(generate, json=body, timeout=60).status_code == 401
    key_file = in_container(init_pid, "cat", "/etc/gguf-appliance/api-keys").stdout
    (key,) = [line for line in key_file.splitlines() if line and not line.startswith("#")]
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    text = []
    with httpx.stream("POST", generate, json=body, headers=headers, timeout=600) as response:
        assert response.status_code == 200, response.read()
        event = None
        events = []
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                events.append(event)
            elif line.startswith("data:") and event == "token":
                text.append(json.loads(line.split(":", 1)[1])["text"])
    timed("streamed /generate through NGINX (max_tokens 16)", started)
    assert events.count("token") > 1 and events[-1] == "done", events
    say(f"/generate streamed {events.count('token')} tokens: {''.join(text)!r}")

    # A grammar runs in a worker process the node starts, under the unit's sandbox.
    chat = {
        "messages": [{"role": "user", "content": "Is water wet? Answer in JSON."}],
        "max_tokens": 16,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "schema": {
                    "type": "object",
                    "properties": {"wet": {"type": "boolean"}},
                    "required": ["wet"],
                }
            },
        },
    }
    started = time.monotonic()
    answer = httpx.post(f"{BASE_URL}/v1/chat/completions", json=chat, headers=headers, timeout=600)
    timed("/v1/chat/completions with a JSON schema through NGINX", started)
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content)["wet"], bool), content
    say(f"/v1 chat with a JSON schema: {content!r}")

    killed = in_container(init_pid, "systemctl", "kill", "--signal=KILL", "gguf-appliance")
    assert killed.returncode == 0, killed.stderr
    started = time.monotonic()
    wait_for(lambda: httpx.get(ready, timeout=5).status_code != 200, 60, "kill had no effect", 0.5)
    wait_for(lambda: httpx.get(ready, timeout=5).status_code == 200, 600, "not back after kill")
    timed("kill -9 to ready again", started)
    restarts = in_container(
        init_pid, "systemctl", "show", "-p", "NRestarts", "--value", "gguf-appliance"
    ).stdout.strip()
    assert int(restarts) >= 1, restarts


def boot_phases(init_pid: int, booted_at_epoch: float) -> None:
    """Boot to ready, split by the journal: until cloud-init runs the bootstrap, the bootstrap
    (pip install of the pins, the cross-built wheel and the package), the node's start."""
    marks = {
        "cloud-init's final stage starts (the bootstrap)": journal_time(
            init_pid, "cloud-final.service", "Cloud-init v."
        ),
        "pip install begins (after pip's self-upgrade)": journal_time(
            init_pid, "cloud-final.service", "Processing /srv/"
        ),
        "pip install done": journal_time(init_pid, "cloud-final.service", "Successfully installed"),
        "units installed, model fetch starts": journal_time(
            init_pid, "gguf-appliance-fetch.service", ""
        ),
        # Type=notify: systemd says Started once the node has sent READY=1 (model loaded).
        "node started and ready": journal_time(
            init_pid, "gguf-appliance.service", "Started gguf-appliance"
        ),
    }
    previous = booted_at_epoch
    for name, at in marks.items():
        if at is None:
            say(f"journal: no mark for {name}")
            continue
        times[f"phase: {name} (since the previous mark)"] = at - previous
        say(f"phase: {name}: +{at - previous:.1f} s")
        previous = at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepare", action="store_true", help="only build the cached arm64 root, do not boot"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (debootstrap, systemd-nspawn, binfmt_misc): sudo make arm64-boot")
    if not WHEEL.exists():
        sys.exit(f"{WHEEL} is missing: run `make arm64-wheel` first")
    began = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_binfmt()
    ensure_base()
    if args.prepare:
        return 0
    model = bundled_model()
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir()
    package = head_wheel(dist)
    say(f"package {package.name}, model {model.name}, llama-cpp-python {WHEEL.name}")
    new_machine(model, package)
    ok = False
    waiting = time.monotonic()
    with cpu_lock("arm64 boot"):
        times["waiting for the CPU lock (left out of end to end)"] = time.monotonic() - waiting
        busy = [port for port in PORTS if port_in_use(port)]
        if busy:
            sys.exit(f"ports {busy} are in use (another boot test or node?): not booting")
        boot_started = time.monotonic()
        with booted(model, package, WORK / "console.log") as init_pid:
            booted_at_epoch = time.time() - (time.monotonic() - boot_started)
            try:
                check_node(init_pid, boot_started)
                ok = True
            except (AssertionError, TimeoutError, httpx.HTTPError, subprocess.SubprocessError):
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    boot_phases(init_pid, booted_at_epoch)
                journal = in_container(init_pid, "journalctl", "-b", "--no-pager")
                (WORK / "journal.txt").write_text(journal.stdout)
    times["end to end (this command, less the lock wait)"] = (
        time.monotonic() - began - times["waiting for the CPU lock (left out of end to end)"]
    )
    (WORK / "result.json").write_text(json.dumps({"ok": ok, "times": times}, indent=2))
    print("Times (seconds; emulated: correctness only, no speed claim):")
    for step, seconds in times.items():
        print(f"  {step}: {seconds:.1f}")
    print(f"arm64 boot {'passed' if ok else 'FAILED'}; journal and result.json in build/arm64-boot")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
