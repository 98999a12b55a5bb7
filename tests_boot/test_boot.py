"""Boot test: a Debian 12 container boots with cloud-init and our cloud-init.yaml as NoCloud
user data, and with no hand step ends serving a streamed answer through NGINX on port 80; after
`kill -9` of the server, systemd brings it back and readiness returns.

Run by `make boot-test` (root, systemd-nspawn, debootstrap). What it stands in for: an OCI VM
booting Ubuntu with this user data. What only a real node shows: OCI's image and its iptables
rules, Arm's build of llama.cpp, the Hugging Face download of the default model (here the model
is a local file and pip's cache is shared so llama-cpp-python is not rebuilt from nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gguf_appliance.settings import DEFAULT_MODEL
from gguf_appliance.sources import resolve_source

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BOOT_TEST_DIR", "/var/tmp/gguf-appliance-boot"))
BASE = WORK / "rootfs-base"
PIP_CACHE = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache/pip"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# The base image carries what cloud-init would install anyway, so each run does not download it.
PACKAGES = (
    "systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates,cloud-init,python3-venv,"
    "python3-dev,python3-pip,build-essential,cmake,git,nginx,python3-cffi-backend"
)


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def base_rootfs() -> Path:
    if not (BASE / "usr/bin/cloud-init").exists():
        shutil.rmtree(BASE, ignore_errors=True)
        BASE.parent.mkdir(parents=True, exist_ok=True)
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include={PACKAGES}",
            "bookworm",
            str(BASE),
            "http://deb.debian.org/debian",
        )
    return BASE


def user_data(model_path: Path, wheel: Path) -> str:
    """Our cloud-init.yaml with the model and the package pointed at files in the container."""
    config = yaml.safe_load((ROOT / "cloud-init.yaml").read_text())
    for entry in config["write_files"]:
        if entry["path"] == "/etc/gguf-appliance/appliance.env":
            entry["content"] = entry["content"].replace(
                entry["content"].split("GGUF_APPLIANCE_MODEL=")[1].split("\n")[0],
                f"/srv/model/{model_path.name}",
            )
        if entry["path"] == "/etc/gguf-appliance/bootstrap.env":
            entry["content"] = (
                entry["content"]
                .replace(
                    "GGUF_APPLIANCE_PACKAGE=gguf-appliance==0.1.0",
                    f"GGUF_APPLIANCE_PACKAGE=/srv/dist/{wheel.name}",
                )
                .replace(
                    # This sandbox reaches PyPI through a TLS proxy with a CA of its own.
                    "PIP_EXTRA=",
                    'PIP_EXTRA="--cert /srv/host-ca.crt"',
                )
            )
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)


def in_container(init_pid: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "-t", str(init_pid), "-m", "-u", "-i", "-n", "-p", "--", *command],
        text=True,
        capture_output=True,
    )


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT))
    wheel = next(dist.glob("gguf_appliance-*.whl"))
    model = resolve_source(DEFAULT_MODEL)
    machine = WORK / "node"
    shutil.rmtree(machine, ignore_errors=True)
    run("cp", "-a", "--reflink=auto", str(base_rootfs()), str(machine))
    seed = machine / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True)
    (seed / "user-data").write_text(user_data(model, wheel))
    (seed / "meta-data").write_text("instance-id: gguf-boot-test\nlocal-hostname: node1\n")
    (machine / "etc/cloud/cloud.cfg.d/99-datasource.cfg").write_text(
        "datasource_list: [NoCloud, None]\n"
    )
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    log = (WORK / "boot.log").open("w")
    nspawn = subprocess.Popen(
        [
            "systemd-nspawn",
            "-D",
            str(machine),
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--bind-ro={dist}:/srv/dist",
            f"--bind-ro={model.parent}:/srv/model",
            f"--bind={PIP_CACHE}:/var/cache/gguf-appliance/pip",
            f"--bind-ro={HOST_CA}:/srv/host-ca.crt",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def container_init() -> str:
            found = subprocess.run(["pgrep", "-P", str(nspawn.pid)], text=True, capture_output=True)
            return found.stdout.strip()

        wait_for(container_init, 30, "container init")
        init_pid = int(container_init().split()[0])
        yield init_pid
    finally:
        nspawn.send_signal(signal.SIGTERM)  # a clean poweroff of the container
        try:
            nspawn.wait(60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
        log.close()


def test_fresh_node_serves_through_nginx_then_survives_kill_9(node: int) -> None:
    ready_url = "http://127.0.0.1:80/health/ready"
    try:
        wait_for(
            lambda: httpx.get(ready_url, timeout=5).status_code == 200,
            900,
            "the node never became ready",
        )
    except TimeoutError:
        print(in_container(node, "cloud-init", "status", "--long").stdout)
        print(in_container(node, "journalctl", "-b", "--no-pager", "-n", "200").stdout)
        raise
    assert "<html" in httpx.get("http://127.0.0.1:80/").text.lower()
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24}
    # The first boot made the node's API key, for root only: no key, no answer.
    generate = "http://127.0.0.1:80/generate"
    assert httpx.post(generate, json=body, timeout=60).status_code == 401
    key_file = in_container(node, "cat", "/etc/gguf-appliance/api-keys").stdout
    (key,) = [line for line in key_file.splitlines() if line and not line.startswith("#")]
    mode = in_container(node, "stat", "-c", "%a %U", "/etc/gguf-appliance/api-keys").stdout
    assert mode.split() == ["600", "root"]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", generate, json=body, headers=headers, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events.count("event: token") > 1 and events[-1] == "event: done"
    # A grammar runs in a worker process the node starts: it must start under the unit's
    # sandbox (system-call filter, address-space limit) and answer within the grammar.
    chat = {
        "messages": [{"role": "user", "content": "Is water wet? Answer in JSON."}],
        "max_tokens": 24,
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
    answer = httpx.post(
        "http://127.0.0.1:80/v1/chat/completions", json=chat, headers=headers, timeout=60
    )
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content)["wet"], bool)

    killed = in_container(node, "systemctl", "kill", "--signal=KILL", "gguf-appliance.service")
    assert killed.returncode == 0, killed.stderr
    wait_for(lambda: httpx.get(ready_url, timeout=5).status_code != 200, 30, "kill had no effect")
    wait_for(
        lambda: httpx.get(ready_url, timeout=5).status_code == 200,
        120,
        "systemd did not bring the node back",
    )
    restarts = in_container(
        node, "systemctl", "show", "-p", "NRestarts", "--value", "gguf-appliance.service"
    ).stdout.strip()
    assert int(restarts) >= 1


def test_keys_reload_under_systemd_and_never_open_the_api(node: int) -> None:
    models = "http://127.0.0.1:80/v1/models"

    def status(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(models, headers=headers, timeout=10).status_code

    def write_keys(text: str) -> None:
        written = in_container(node, "sh", "-c", f"printf '{text}' > /etc/gguf-appliance/api-keys")
        assert written.returncode == 0, written.stderr

    def reload() -> int:
        return in_container(node, "systemctl", "reload", "gguf-appliance.service").returncode

    wait_for(lambda: httpx.get(models, timeout=5).status_code == 401, 120, "the node is not back")
    new = "n" * 32
    write_keys(f"# rotated\\n{new}\\n")
    assert reload() == 0
    wait_for(lambda: status(new) == 200, 30, "the new key was not taken up")

    # Comments only: systemd's reload passes, the app keeps the key in force.
    write_keys("# no key at all\\n")
    assert reload() == 0
    time.sleep(2)
    assert status(new) == 200 and httpx.get(models, timeout=5).status_code == 401
    journal = in_container(node, "journalctl", "-u", "gguf-appliance", "--no-pager", "-n", "50")
    assert "holds no key" in journal.stdout
    # No file: the reload fails, the key stays.
    assert in_container(node, "rm", "/etc/gguf-appliance/api-keys").returncode == 0
    assert reload() != 0
    assert status(new) == 200

    # What the service user could leave in its own directory is never written through by root.
    write_keys(f"{new}\\n")
    for name in ("api-keys", "api-keys.new"):
        link = f"/run/gguf-appliance/{name}"
        assert (
            in_container(node, "ln", "-sf", "/etc/gguf-appliance/appliance.env", link).returncode
            == 0
        )
    before = in_container(
        node, "stat", "-c", "%s %U %a", "/etc/gguf-appliance/appliance.env"
    ).stdout
    assert reload() == 0
    after = in_container(node, "stat", "-c", "%s %U %a", "/etc/gguf-appliance/appliance.env").stdout
    assert after == before
    assert status(new) == 200

    # The node reads its model but cannot write where it lives.
    pid = in_container(
        node, "systemctl", "show", "-p", "MainPID", "--value", "gguf-appliance.service"
    ).stdout.strip()
    probe = in_container(
        node, "nsenter", "-t", pid, "-m", "--", "touch", "/var/lib/gguf-appliance/probe"
    )
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
