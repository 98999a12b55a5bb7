"""Boot test: a Debian 12 container boots with cloud-init and our cloud-init.yaml as NoCloud
user data, and with no hand step ends serving a streamed answer through NGINX on port 80; after
`kill -9` of the server, systemd brings it back and readiness returns. Then the bootstrapped root
is baked as deploy/oci's builder bakes one (the bootstrap again with GGUF_APPLIANCE_BAKE=yes: the
model verified, cloud-init's instance state and the machine-id cleaned, powered off), copied, and
booted with a new instance id: it must serve with no apt, no compiler, no pip and no download.

Run by `make boot-test` (root, systemd-nspawn, debootstrap). What it stands in for: an OCI VM
booting Ubuntu with this user data, and the pool's nodes booting the image deploy/oci captures.
What only a real node shows: OCI's image and its iptables rules, Arm's build of llama.cpp, the
Hugging Face download of the default model (here the model comes from an HTTP server on this
host with its sha256 pinned, as from the bucket's pre-authenticated request, and pip's cache is
shared so llama-cpp-python is not rebuilt from nothing).

The containers share the host's network: ports 80 and 8000 must be free on the host, or the test
would talk to whatever holds them.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from tests import oci_stand_in
from tests.conftest import free_port
from tests.hub_server import TOKEN as HUB_TOKEN
from tests.hub_server import HubServer, HubState
from tests.oci_stand_in import Received, StandIn

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
# NGINX's port and the node's: the test reaches the container's node on them.
HOST_PORTS = (80, 8000)
READY_URL = "http://127.0.0.1:80/health/ready"
# The baked boot's target (issue #17): ready this many seconds after the container starts.
BAKED_BOOT_TARGET = 60.0
# What a baked boot must never run; each is replaced in the baked copy by a script that notes
# its call in TRIPWIRE_LOG and fails.
TRIPWIRES = (
    "opt/gguf-appliance/bin/pip",
    "opt/gguf-appliance/bin/pip3",
    "usr/bin/apt-get",
    "usr/bin/apt",
    "usr/bin/cmake",
    "usr/bin/cc",
    "usr/bin/c++",
    "usr/bin/gcc",
    "usr/bin/g++",
)
TRIPWIRE_LOG = "var/log/boot-test-tripwire.log"


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def check_host_ports_free() -> None:
    """Fail, naming the port and its process, if anything on the host listens on HOST_PORTS."""
    for port in HOST_PORTS:
        found = run("ss", "-Hltnp", f"sport = :{port}").stdout.strip()
        if found:
            processes = sorted(set(re.findall(r'\("([^"]+)",pid=(\d+)', found)))
            who = ", ".join(f"{name} (pid {pid})" for name, pid in processes) or found
            pytest.fail(
                f"port {port} on this host is taken by {who}: the boot test's containers share "
                f"the host's network, so it would test that process instead of the container's "
                f"node. Stop it and run the test again."
            )


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


class ModelServer:
    """The model over HTTP on this host, as the bucket's pre-authenticated request serves it;
    every request is noted."""

    def __init__(self, model: Path) -> None:
        self.model = model
        self.sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
        self.requests: list[str] = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests.append(self.path)
                if self.path != f"/{model.name}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(model.stat().st_size))
                self.end_headers()
                with model.open("rb") as file:
                    shutil.copyfileobj(file, self.wfile)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{model.name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def user_data(model: ModelServer, wheel: Path) -> str:
    """Our cloud-init.yaml with the model and the package pointed at this host's files."""
    config = yaml.safe_load((ROOT / "cloud-init.yaml").read_text())
    for entry in config["write_files"]:
        if entry["path"] == "/etc/gguf-appliance/appliance.env":
            content = re.sub(
                r"(?m)^GGUF_APPLIANCE_MODEL=.*$",
                f"GGUF_APPLIANCE_MODEL={model.url}",
                entry["content"],
            )
            content = re.sub(
                r"(?m)^#GGUF_APPLIANCE_MODEL_SHA256=$",
                f"GGUF_APPLIANCE_MODEL_SHA256={model.sha256}",
                content,
            )
            assert model.sha256 in content
            entry["content"] = content
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


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(every)
    raise TimeoutError(what)


@dataclass
class Machine:
    root: Path
    nspawn: subprocess.Popen[bytes]
    init_pid: int
    # time.monotonic() when systemd-nspawn was started, and seconds from then to ready.
    started: float
    ready_after: float | None = field(default=None)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the container's start to /health/ready answering 200 through NGINX."""
        try:
            wait_for(
                lambda: httpx.get(READY_URL, timeout=5).status_code == 200,
                timeout,
                "the node never became ready",
                every=0.25,
            )
        except TimeoutError:
            print(in_container(self.init_pid, "cloud-init", "status", "--long").stdout)
            print(in_container(self.init_pid, "journalctl", "-b", "--no-pager", "-n", "200").stdout)
            raise
        if self.ready_after is None:
            self.ready_after = time.monotonic() - self.started
        return self.ready_after

    def power_off(self) -> None:
        self.nspawn.send_signal(signal.SIGTERM)  # a clean poweroff of the container
        try:
            self.nspawn.wait(60)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait(10)


def boot(root: Path, log_name: str, binds: list[str]) -> Machine:
    log = (WORK / log_name).open("w")
    started = time.monotonic()
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit", *binds],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()  # the child holds its own copy

    def container_init() -> str:
        found = subprocess.run(["pgrep", "-P", str(nspawn.pid)], text=True, capture_output=True)
        return found.stdout.strip()

    try:
        wait_for(container_init, 30, "container init", every=0.1)
    except TimeoutError:
        nspawn.kill()
        nspawn.wait(10)
        raise
    return Machine(root, nspawn, int(container_init().split()[0]), started)


def seed(root: Path, user_data_text: str, instance_id: str, hostname: str) -> None:
    nocloud = root / "var/lib/cloud/seed/nocloud"
    nocloud.mkdir(parents=True, exist_ok=True)
    (nocloud / "user-data").write_text(user_data_text)
    (nocloud / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")


def api_key(machine: Machine) -> str:
    key_file = in_container(machine.init_pid, "cat", "/etc/gguf-appliance/api-keys").stdout
    (key,) = [line for line in key_file.splitlines() if line and not line.startswith("#")]
    return key


def streamed_events(key: str) -> list[str]:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24}
    headers = {"Authorization": f"Bearer {key}"}
    generate = "http://127.0.0.1:80/generate"
    with httpx.stream("POST", generate, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [line for line in response.iter_lines() if line.startswith("event:")]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT))
    return out


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    server = ModelServer(resolve_source(DEFAULT_MODEL))
    yield server
    server.close()


@pytest.fixture(scope="module")
def node(dist: Path, model_server: ModelServer) -> Iterator[Machine]:
    check_host_ports_free()
    wheel = next(dist.glob("gguf_appliance-*.whl"))
    root = WORK / "node"
    shutil.rmtree(root, ignore_errors=True)
    run("cp", "-a", "--reflink=auto", str(base_rootfs()), str(root))
    seed(root, user_data(model_server, wheel), "gguf-boot-test", "node1")
    (root / "etc/cloud/cloud.cfg.d/99-datasource.cfg").write_text(
        "datasource_list: [NoCloud, None]\n"
    )
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    machine = boot(
        root,
        "boot.log",
        [
            f"--bind-ro={dist}:/srv/dist",
            f"--bind={PIP_CACHE}:/var/cache/gguf-appliance/pip",
            f"--bind-ro={HOST_CA}:/srv/host-ca.crt",
        ],
    )
    try:
        yield machine
    finally:
        machine.power_off()


def test_fresh_node_serves_through_nginx_then_survives_kill_9(
    node: Machine, model_server: ModelServer
) -> None:
    ready_after = node.wait_ready(900)
    print(f"\nfirst boot: ready through NGINX {ready_after:.1f} s after the container started")
    # The fetch unit downloaded the model from the host, checked against the pinned sha256.
    assert model_server.requests.count(f"/{model_server.model.name}") == 1
    assert "<html" in httpx.get("http://127.0.0.1:80/").text.lower()
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24}
    # The first boot made the node's API key, for root only: no key, no answer.
    assert httpx.post("http://127.0.0.1:80/generate", json=body, timeout=60).status_code == 401
    key = api_key(node)
    mode = in_container(node.init_pid, "stat", "-c", "%a %U", "/etc/gguf-appliance/api-keys")
    assert mode.stdout.split() == ["600", "root"]
    headers = {"Authorization": f"Bearer {key}"}
    events = streamed_events(key)
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

    killed = in_container(
        node.init_pid, "systemctl", "kill", "--signal=KILL", "gguf-appliance.service"
    )
    assert killed.returncode == 0, killed.stderr
    wait_for(lambda: httpx.get(READY_URL, timeout=5).status_code != 200, 30, "kill had no effect")
    wait_for(
        lambda: httpx.get(READY_URL, timeout=5).status_code == 200,
        120,
        "systemd did not bring the node back",
    )
    restarts = in_container(
        node.init_pid, "systemctl", "show", "-p", "NRestarts", "--value", "gguf-appliance.service"
    ).stdout.strip()
    assert int(restarts) >= 1


def test_keys_reload_under_systemd_and_never_open_the_api(node: Machine) -> None:
    models = "http://127.0.0.1:80/v1/models"

    def status(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(models, headers=headers, timeout=10).status_code

    def write_keys(text: str) -> None:
        written = in_container(
            node.init_pid, "sh", "-c", f"printf '{text}' > /etc/gguf-appliance/api-keys"
        )
        assert written.returncode == 0, written.stderr

    def reload() -> int:
        return in_container(
            node.init_pid, "systemctl", "reload", "gguf-appliance.service"
        ).returncode

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
    journal = in_container(
        node.init_pid, "journalctl", "-u", "gguf-appliance", "--no-pager", "-n", "50"
    )
    assert "holds no key" in journal.stdout
    # No file: the reload fails, the key stays.
    assert in_container(node.init_pid, "rm", "/etc/gguf-appliance/api-keys").returncode == 0
    assert reload() != 0
    assert status(new) == 200

    # What the service user could leave in its own directory is never written through by root.
    write_keys(f"{new}\\n")
    for name in ("api-keys", "api-keys.new"):
        link = f"/run/gguf-appliance/{name}"
        assert (
            in_container(
                node.init_pid, "ln", "-sf", "/etc/gguf-appliance/appliance.env", link
            ).returncode
            == 0
        )
    before = in_container(
        node.init_pid, "stat", "-c", "%s %U %a", "/etc/gguf-appliance/appliance.env"
    ).stdout
    assert reload() == 0
    after = in_container(
        node.init_pid, "stat", "-c", "%s %U %a", "/etc/gguf-appliance/appliance.env"
    ).stdout
    assert after == before
    assert status(new) == 200

    # The node reads its model but cannot write where it lives.
    pid = in_container(
        node.init_pid, "systemctl", "show", "-p", "MainPID", "--value", "gguf-appliance.service"
    ).stdout.strip()
    probe = in_container(
        node.init_pid, "nsenter", "-t", pid, "-m", "--", "touch", "/var/lib/gguf-appliance/probe"
    )
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr


VAULT_SECRET = "ocid1.vaultsecret.oc1..boottesthftoken"
# Settings for the secrets and fetch units during the token test: runtime drop-ins name this file
# (after appliance.env, so it wins), and all of it goes with the next boot.
TEST_ENV = "/run/gguf-appliance-boot-test.env"
GATED_MODELS = "/var/lib/gguf-appliance/boot-test-gated"
FETCH_CREDENTIAL = "/run/credentials/gguf-appliance-fetch.service/hf-token"


def vault_answer(request: Received) -> tuple[int, object]:
    """The Vault's GetSecretBundle, as tests/test_oci_secrets.py stands it in: one secret."""
    if request.path.split("?")[0].rsplit("/", 1)[-1] != VAULT_SECRET:
        return 404, {"code": "NotAuthorizedOrNotFound", "message": "no such secret"}
    return 200, {
        "secretId": VAULT_SECRET,
        "versionNumber": 1,
        "stages": ["CURRENT", "LATEST"],
        "secretBundleContent": {
            "contentType": "BASE64",
            "content": base64.b64encode(HUB_TOKEN.encode()).decode(),
        },
    }


def test_the_hf_token_goes_from_the_vault_to_the_fetch_unit_alone(
    node: Machine, model_server: ModelServer
) -> None:
    """The token's whole way under systemd: gguf-appliance-secrets reads it from a Vault (a
    stand-in on this host, signed with an OCI config file: instance principals cannot be stood
    in) into /etc/gguf-appliance/hf-token; the fetch unit gets it as its credential and fetches
    a gated model from a Hub stand-in on this host; the node cannot read it; no log holds it.
    Without a token file the fetch unit still starts (no 243/CREDENTIALS) and says what is
    missing. The fetch runs with its shipped unit; a drop-in only names the gated model."""
    wait_for(lambda: httpx.get(READY_URL, timeout=5).status_code == 200, 120, "node not ready")
    hub_state = HubState()
    hub_state.add_file("acme/gated", "model.gguf", model_server.model)  # the same file, sha256
    hub_state.gated.add("acme/gated")
    hub_state.granted.add("acme/gated")
    hub = HubServer(hub_state, free_port()).start()
    # The Hub stand-in sends downloads to its "CDN", http://localhost:PORT (another host name, as
    # on the real Hub); debootstrap's minimal root has no /etc/hosts to resolve it (a cloud
    # image has one).
    hosts = node.root / "etc/hosts"
    made_hosts = not hosts.exists()
    if made_hosts:
        hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    oci_dir = node.root / "etc/gguf-appliance/boot-test-oci"
    oci_dir.mkdir(mode=0o700, exist_ok=True)
    config, _ = oci_stand_in.throwaway_oci_config(oci_dir)
    config.write_text(config.read_text().replace(str(node.root), ""))  # paths as the node sees

    def sh(script: str) -> subprocess.CompletedProcess[str]:
        return in_container(node.init_pid, "sh", "-euc", script)

    def settings(stand_in: StandIn, *, vault: bool) -> None:
        lines = [
            "GGUF_APPLIANCE_OCI_AUTH=config_file",
            f"GGUF_APPLIANCE_OCI_CONFIG_FILE=/{config.relative_to(node.root)}",
            f"GGUF_APPLIANCE_OCI_SECRETS_ENDPOINT={stand_in.url}",
            f"HF_ENDPOINT={hub.url}",
        ] + ([f"GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET={VAULT_SECRET}"] if vault else [])
        written = sh(f"umask 077; printf '%s\\n' {' '.join(lines)} > {TEST_ENV}")
        assert written.returncode == 0, written.stderr

    def show(unit: str) -> dict[str, str]:
        shown = in_container(
            node.init_pid, "systemctl", "show", "-p", "Result", "-p", "ExecMainStatus", unit
        ).stdout
        return dict(line.split("=", 1) for line in shown.splitlines())

    def journal(unit: str) -> str:
        return in_container(node.init_pid, "journalctl", "-b", "-u", unit, "--no-pager").stdout

    bin_dir = "/opt/gguf-appliance/bin"
    drop_ins = sh(
        "for unit in gguf-appliance-secrets gguf-appliance-fetch; do"
        "  mkdir -p /run/systemd/system/$unit.service.d;"
        f"  printf '[Service]\\nEnvironmentFile={TEST_ENV}\\n'"
        "    > /run/systemd/system/$unit.service.d/boot-test.conf;"
        "done;"
        f"printf '[Service]\\nEnvironment=GGUF_APPLIANCE_MODELS_DIR={GATED_MODELS}\\n"
        f"ExecStart=\\nExecStart={bin_dir}/gguf-appliance fetch hf://acme/gated/model.gguf\\n'"
        "  >> /run/systemd/system/gguf-appliance-fetch.service.d/boot-test.conf;"
        "systemctl daemon-reload"
    )
    assert drop_ins.returncode == 0, drop_ins.stderr
    try:
        with oci_stand_in.running(vault_answer) as stand_in:
            # No secret named, no token file: the unit starts (no 243/CREDENTIALS), the Hub
            # refuses the gated file, and the message says where a token would come from. (The
            # node, which requires the fetch, goes down with it.)
            settings(stand_in, vault=False)
            assert not (node.root / "etc/gguf-appliance/hf-token").exists()
            assert sh("systemctl restart gguf-appliance-fetch.service").returncode != 0
            assert show("gguf-appliance-fetch.service") == {
                "Result": "exit-code",
                "ExecMainStatus": "1",
            }
            assert "acme/gated is gated, and no Hugging Face token was given" in journal(
                "gguf-appliance-fetch.service"
            )
            assert hub_state.authorizations == [None]
            assert stand_in.requests() == []

            # The Vault's secret named: the fetch unit asks for the secrets unit, which writes
            # the token file; the fetch reads it as its credential, and the Hub gets it.
            hub_state.authorizations.clear()
            settings(stand_in, vault=True)
            fetched = sh(
                "systemctl restart gguf-appliance-fetch.service; "
                "systemctl start gguf-appliance.service"
            )
            assert fetched.returncode == 0, fetched.stderr + journal("gguf-appliance-fetch")
            assert len(stand_in.requests()) >= 1
            token_file = node.root / "etc/gguf-appliance/hf-token"
            assert token_file.read_text() == HUB_TOKEN + "\n"
            assert (token_file.stat().st_mode & 0o777, token_file.stat().st_uid) == (0o600, 0)
            assert hub_state.authorizations and set(hub_state.authorizations) == {
                f"Bearer {HUB_TOKEN}"
            }
            found = sh("find /var/lib/private/gguf-appliance/boot-test-gated -name model.gguf")
            assert found.stdout.strip(), found.stderr

        # The credential stays while the fetch unit stays active, and the node runs as its user:
        # systemd makes /run/credentials inaccessible in the node's mount namespace.
        wait_for(lambda: httpx.get(READY_URL, timeout=5).status_code == 200, 120, "node down")
        assert sh(f"cat {FETCH_CREDENTIAL}").stdout == HUB_TOKEN + "\n"
        pid = in_container(
            node.init_pid, "systemctl", "show", "-p", "MainPID", "--value", "gguf-appliance"
        ).stdout.strip()
        peek = in_container(
            node.init_pid, "nsenter", "-t", pid, "-m", "--", "cat", FETCH_CREDENTIAL
        )
        assert peek.returncode != 0 and HUB_TOKEN not in peek.stdout, peek
        environ = sh(f"cat /proc/{pid}/environ").stdout
        # Neither an environment nor a log holds it: the node's, the units' settings, the journal.
        assert HUB_TOKEN not in environ
        for unit in ("gguf-appliance-fetch", "gguf-appliance-secrets", "gguf-appliance"):
            shown = in_container(node.init_pid, "systemctl", "show", unit).stdout
            assert HUB_TOKEN not in shown, unit
        everything = in_container(node.init_pid, "journalctl", "-b", "-o", "json", "--no-pager")
        assert everything.stdout and HUB_TOKEN not in everything.stdout
    finally:
        hub.stop()
        if made_hosts:
            hosts.unlink()
        cleaned = sh(
            "rm -rf /run/systemd/system/gguf-appliance-secrets.service.d "
            "/run/systemd/system/gguf-appliance-fetch.service.d "
            f"{TEST_ENV} /etc/gguf-appliance/hf-token /etc/gguf-appliance/boot-test-oci "
            "/var/lib/private/gguf-appliance/boot-test-gated; "
            "systemctl daemon-reload; "
            "systemctl restart gguf-appliance-fetch.service; "
            "systemctl start gguf-appliance.service"
        )
        assert cleaned.returncode == 0, cleaned.stderr
    # Back as it was, for the bake: the model in place, the fetch's credential a blank line.
    wait_for(lambda: httpx.get(READY_URL, timeout=5).status_code == 200, 120, "node not back")
    assert sh(f"cat {FETCH_CREDENTIAL}").stdout == "\n"


def model_files(root: Path) -> dict[str, tuple[int, int, int]]:
    """The fetched model and its verification record: path -> (inode, size, mtime_ns)."""
    models = root / "var/lib/private/gguf-appliance/models"
    found = {}
    for path in models.rglob("*"):
        if path.is_file() and path.name.endswith((".gguf", ".verified")):
            stat = path.stat()
            found[str(path.relative_to(models))] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


def set_tripwires(root: Path) -> None:
    for relative in TRIPWIRES:
        path = root / relative
        assert path.exists() or path.is_symlink(), f"no {relative} to guard"
        path.unlink()
        path.write_text(f'#!/bin/sh\necho "$0 $*" >> /{TRIPWIRE_LOG}\nexit 1\n')
        path.chmod(0o755)


@dataclass
class BakedBoot:
    machine: Machine
    # The model files in the copy before it booted, and the model server's requests until then.
    model_files: dict[str, tuple[int, int, int]]
    requests_before: int


@pytest.fixture(scope="module")
def baked_node(node: Machine, dist: Path, model_server: ModelServer) -> Iterator[BakedBoot]:
    """The first node's root, baked as the builder bakes (the bootstrap with
    GGUF_APPLIANCE_BAKE=yes, which seals and powers off), copied, and booted as a new instance."""
    assert node.nspawn.poll() is None, "the first node is not running"
    baking = in_container(
        node.init_pid,
        "sed",
        "-i",
        "s/^GGUF_APPLIANCE_BAKE=no$/GGUF_APPLIANCE_BAKE=yes/",
        "/etc/gguf-appliance/bootstrap.env",
    )
    assert baking.returncode == 0, baking.stderr
    # As cloud-init runs it: a clean environment (not this host's pip settings).
    baked = in_container(
        node.init_pid,
        *("env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "/usr/local/sbin/gguf-appliance-bootstrap",
    )
    assert baked.returncode == 0, baked.stdout + baked.stderr
    # The seal runs after the bootstrap and powers the machine off: a clean shutdown.
    assert node.nspawn.wait(180) == 0
    sealed = node.root
    record = (sealed / "etc/gguf-appliance/baked").read_text()
    assert record.startswith("PACKAGE=/srv/dist/gguf_appliance-"), record
    assert not (sealed / "etc/gguf-appliance/api-keys").exists()
    assert not (sealed / "var/lib/cloud/instance").exists()
    assert not list((sealed / "var/lib/cloud").glob("instances/*"))
    assert not (sealed / "var/log/cloud-init.log").exists()
    assert (sealed / "etc/machine-id").read_text() == ""
    wants = sealed / "etc/systemd/system/multi-user.target.wants"
    # (Links to absolute paths: is_symlink, as the host may not have what they name.)
    assert not (wants / "gguf-appliance.service").is_symlink()
    assert (wants / "nginx.service").is_symlink()

    root = WORK / "baked-node"
    shutil.rmtree(root, ignore_errors=True)
    run("cp", "-a", "--reflink=auto", str(sealed), str(root))
    # The same user data (the image's nodes share one instance configuration), a new instance.
    wheel = next(dist.glob("gguf_appliance-*.whl"))
    seed(root, user_data(model_server, wheel), "gguf-boot-test-baked", "node2")
    set_tripwires(root)
    before = model_files(root)
    assert len(before) == 2, before
    requests_before = len(model_server.requests)
    check_host_ports_free()
    machine = boot(root, "boot-baked.log", [f"--bind-ro={HOST_CA}:/srv/host-ca.crt"])
    try:
        yield BakedBoot(machine, before, requests_before)
    finally:
        machine.power_off()


def test_baked_root_with_a_new_instance_id_serves_without_install_or_download(
    node: Machine, baked_node: BakedBoot, model_server: ModelServer
) -> None:
    baked = baked_node.machine
    ready_after = baked.wait_ready(300)
    print(
        f"\nboot to ready through NGINX: first boot {node.ready_after or float('nan'):.1f} s, "
        f"baked boot {ready_after:.1f} s"
    )
    # A new instance: cloud-init ran this user data's write_files and runcmd again.
    instance = (baked.root / "var/lib/cloud/data/instance-id").read_text().strip()
    assert instance == "gguf-boot-test-baked"
    events = streamed_events(api_key(baked))
    assert events.count("event: token") > 1 and events[-1] == "event: done"

    # No apt, no compiler, no pip: none of them ran (each would have noted its call).
    tripwire = baked.root / TRIPWIRE_LOG
    assert not tripwire.exists(), tripwire.read_text()
    output = (baked.root / "var/log/cloud-init-output.log").read_text()
    assert "gguf-appliance-bootstrap: a baked image: no apt, no pip, no compiler" in output
    assert "gguf-appliance-bootstrap: installing" not in output
    # No download: the model's server was not asked, the baked file was not rewritten.
    assert model_server.requests[baked_node.requests_before :] == []
    assert model_files(baked.root) == baked_node.model_files
    assert ready_after < BAKED_BOOT_TARGET
