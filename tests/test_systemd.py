"""sd_notify as systemd would receive it: datagrams on a real NOTIFY_SOCKET, in process; and
what each unit lets its process reach over IP, read from the unit files as systemd would."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gguf_appliance.install import UNITS, InstallPlan, rendered_files
from gguf_appliance.oci_secrets import DEFAULT_HF_TOKEN_FILE
from gguf_appliance.resources import shipped, static_dir
from gguf_appliance.systemd import SystemdNotifier

WATCHDOG_USEC = 100_000  # pings every 0.05 s
# A guard: a notify() that blocked on a full queue would hang a test, not fail it.
pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def systemd_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No notify variables from the environment the tests run in (they may run under systemd)."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def systemd_socket(tmp_path: Path, systemd_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket where systemd would listen, named to the app by NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(2)
        systemd_env.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        yield sock


def nothing_queued(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2)
    return False


async def receive(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), 2)


def test_ready_and_status_arrive_as_one_datagram(systemd_socket: socket.socket) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled
    notifier.notify("READY=1", "STATUS=serving model.gguf")
    notifier.notify("STOPPING=1")
    assert systemd_socket.recv(4096) == b"READY=1\nSTATUS=serving model.gguf"
    assert systemd_socket.recv(4096) == b"STOPPING=1"


def test_an_abstract_socket_is_named_with_an_at_sign(systemd_env: pytest.MonkeyPatch) -> None:
    name = f"gguf-appliance-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        systemd_env.setenv("NOTIFY_SOCKET", "@" + name)
        SystemdNotifier().notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, ""])
def test_without_notify_socket_notify_does_nothing(
    systemd_env: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        systemd_env.setenv("NOTIFY_SOCKET", value)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier.notify("READY=1", "STATUS=serving model.gguf")  # no socket, no error


@pytest.mark.parametrize(
    ("watchdog_pid", "watched"),
    [(None, True), (str(os.getpid()), True), (str(os.getppid()), False)],
    ids=["unset", "this-process", "another-process"],
)
def test_the_watchdog_is_ours_only_when_watchdog_pid_is_unset_or_our_pid(
    systemd_socket: socket.socket,
    systemd_env: pytest.MonkeyPatch,
    watchdog_pid: str | None,
    watched: bool,
) -> None:
    systemd_env.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    if watchdog_pid is not None:
        systemd_env.setenv("WATCHDOG_PID", watchdog_pid)
    notifier = SystemdNotifier()
    assert notifier.watchdog_seconds == (0.1 if watched else None)
    if not watched:
        # Another process's watchdog: the loop returns at once and pings nothing.
        asyncio.run(asyncio.wait_for(notifier.watchdog(lambda: True), 1))
        assert nothing_queued(systemd_socket)


def test_the_watchdog_pings_about_every_half_interval_while_healthy(
    systemd_socket: socket.socket, systemd_env: pytest.MonkeyPatch
) -> None:
    systemd_env.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))

    async def arrivals(count: int) -> list[tuple[bytes, float]]:
        task = asyncio.create_task(SystemdNotifier().watchdog(lambda: True))
        try:
            return [(await receive(systemd_socket), time.monotonic()) for _ in range(count)]
        finally:
            task.cancel()

    pings = asyncio.run(arrivals(6))
    assert {data for data, _ in pings} == {b"WATCHDOG=1"}
    gap = (pings[-1][1] - pings[0][1]) / (len(pings) - 1)
    # Half of the 0.1 s interval; well inside it, so systemd never sees the deadline pass.
    assert 0.045 <= gap < 0.1, gap


def test_no_pings_while_unhealthy_and_they_resume_when_healthy(
    systemd_socket: socket.socket,
    systemd_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    systemd_env.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))

    def refusing(times: int, refused: asyncio.Event) -> Callable[[], bool]:
        checks = 0

        def healthy() -> bool:
            nonlocal checks
            checks += 1
            if checks == times:
                refused.set()
            return checks > times

        return healthy

    async def scenario() -> bytes:
        refused = asyncio.Event()
        task = asyncio.create_task(SystemdNotifier().watchdog(refusing(3, refused)))
        try:
            await asyncio.wait_for(refused.wait(), 2)
            # Three checks said unhealthy (0.1 s: a whole interval) and systemd got nothing.
            assert nothing_queued(systemd_socket)
            return await receive(systemd_socket)
        finally:
            task.cancel()

    with caplog.at_level(logging.ERROR, logger="gguf_appliance.systemd"):
        assert asyncio.run(scenario()) == b"WATCHDOG=1"
    refusals = [r for r in caplog.records if "not pinging the watchdog" in r.getMessage()]
    assert len(refusals) == 3


def test_a_socket_path_that_does_not_exist_logs_a_warning(
    tmp_path: Path, systemd_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    systemd_env.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    notifier = SystemdNotifier()
    assert notifier.enabled
    with caplog.at_level(logging.WARNING, logger="gguf_appliance.systemd"):
        notifier.notify("READY=1")  # does not raise: the node keeps serving
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "cannot notify systemd" in record.getMessage()


def fill(address: str) -> int:
    """Send to `address` until its queue is full (the next send would block): how many it took.

    A fresh socket for each datagram, as notify() uses, so that what fills is the receiver's queue
    (net.unix.max_dgram_qlen), not one sender's buffer.
    """
    for sent in range(100_000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(b"filler", address)
            except BlockingIOError:
                return sent
    raise AssertionError("the queue never filled")


def test_a_full_queue_drops_the_message_at_once_and_warns_once(
    systemd_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    # systemd stuck, or slower than the pings: its socket holds all the datagrams it will take.
    notifier = SystemdNotifier()
    assert notifier.address is not None
    assert fill(notifier.address) > 0
    with caplog.at_level(logging.WARNING, logger="gguf_appliance.systemd"):
        started = time.monotonic()
        notifier.notify("WATCHDOG=1")  # on the event loop: it must not wait for room
        elapsed = time.monotonic() - started
        for _ in range(20):  # a watchdog's later pings, still no room
            notifier.notify("WATCHDOG=1")
    assert elapsed < 0.2, elapsed
    (record,) = caplog.records  # one warning, not one per ping
    assert record.levelno == logging.WARNING
    assert "cannot notify systemd: its socket's queue is full; dropped WATCHDOG=1" in (
        record.getMessage()
    )
    # The pings were dropped, not queued behind the filler; once systemd reads, they arrive.
    systemd_socket.setblocking(False)
    drained = []
    with contextlib.suppress(BlockingIOError):
        while True:
            drained.append(systemd_socket.recv(4096))
    assert set(drained) == {b"filler"}
    notifier.notify("WATCHDOG=1")
    systemd_socket.settimeout(2)
    assert systemd_socket.recv(4096) == b"WATCHDOG=1"


# --- what each unit may reach over IP ---
# IPAddressAllow=/IPAddressDeny= act on the unit's whole control group, '+' steps included: an
# address in an allow list passes, else one in a deny list is dropped, else it passes.

LOOPBACK = "127.0.0.1"
METADATA = "169.254.169.254"  # instance principals' certificates; the VCN's DNS resolver
# A public address as OCI's service endpoints have (telemetry-ingestion, secrets.vaults, auth),
# reached through the service or NAT gateway; and the Hub's, reached through the NAT gateway.
OCI_SERVICE = "134.70.24.1"
HUB = "18.164.174.17"
VCN = ("10.0.0.5", "172.16.3.4", "192.168.1.1", "100.64.0.1", "fd00::1")  # other nodes, the LB
OTHER_LINK_LOCAL = ("169.254.0.2", "fe80::1")

_SYMBOLIC = {
    "any": ("0.0.0.0/0", "::/0"),
    "localhost": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/64"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}


def unit_directives(unit: str) -> dict[str, list[str]]:
    """Each directive's values in order, as the shipped file gives them (an empty one resets)."""
    values: dict[str, list[str]] = {}
    for line in (shipped("systemd") / unit).read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def ip_lists(unit: str) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], ...]:
    directives = unit_directives(unit)
    lists = []
    for key in ("IPAddressAllow", "IPAddressDeny"):
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for value in directives.get(key, []):
            if not value:
                networks = []
            for word in value.split():
                networks += [ipaddress.ip_network(n) for n in _SYMBOLIC.get(word, (word,))]
        lists.append(networks)
    return tuple(lists)


def reaches(unit: str, address: str) -> bool:
    allow, deny = ip_lists(unit)
    ip = ipaddress.ip_address(address)
    return any(ip in n for n in allow if n.version == ip.version) or not any(
        ip in n for n in deny if n.version == ip.version
    )


def commands(unit: str) -> list[str]:
    directives = unit_directives(unit)
    return [v for key, vs in directives.items() if key.startswith("Exec") for v in vs]


def test_the_reach_check_reads_allow_over_deny() -> None:
    assert reaches("gguf-appliance.service", "127.0.0.53")
    assert not reaches("gguf-appliance.service", "8.8.8.8")
    assert not reaches("gguf-appliance.service", "::2")


@pytest.mark.parametrize(
    ("command", "unit"),
    [
        ("gguf-appliance serve", "gguf-appliance.service"),
        ("gguf-appliance fetch", "gguf-appliance-fetch.service"),
        ("gguf-appliance vault-secrets", "gguf-appliance-secrets.service"),
        ("gguf-appliance oci-metrics", "gguf-appliance-oci-metrics.service"),
    ],
)
def test_each_command_that_goes_out_runs_in_one_unit_only(command: str, unit: str) -> None:
    # The command alone or with options (the fetch's --retry-for).
    running = [
        u for u in UNITS if any(c.endswith(command) or f"{command} --" in c for c in commands(u))
    ]
    assert running == [unit]


def test_the_node_reaches_loopback_only(tmp_path: Path) -> None:
    node = "gguf-appliance.service"
    assert reaches(node, LOOPBACK) and reaches(node, "::1")
    for address in (METADATA, OCI_SERVICE, HUB, *VCN, *OTHER_LINK_LOCAL):
        assert not reaches(node, address), address
    # And systemd reads the unit so: its allow list holds loopback alone.
    plan = InstallPlan(bin_dir=Path(sys.executable).parent, static_dir=static_dir())
    (rendered,) = [t for p, t in rendered_files(plan).items() if p.name == node]
    (tmp_path / node).write_text(rendered)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(tmp_path / node)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert re.search(
        r"IPAddressDeny=\s+Service defines IP address allow list with only "
        r"localhost entries",
        result.stdout,
    ), result.stdout


def test_the_nodes_own_steps_make_no_call_beyond_loopback() -> None:
    # '+' steps run in the node's control group, under its IP lists: they may only hand work to
    # other units (systemctl, over a Unix socket) and copy files.
    allowed = (
        "@BIN@/gguf-appliance serve",
        "+/bin/systemctl start gguf-appliance-secrets.service",
        "+/bin/sh -euc 'umask 077; mkdir -p /run/gguf-appliance-keys;",
        "/bin/kill -HUP $MAINPID",
        "+/bin/rm -rf /run/gguf-appliance-keys",
    )
    for command in commands("gguf-appliance.service"):
        assert command.startswith(allowed), command


@pytest.mark.parametrize(
    "unit", ["gguf-appliance-secrets.service", "gguf-appliance-oci-metrics.service"]
)
def test_the_oci_helpers_reach_the_metadata_service_and_public_endpoints_only(unit: str) -> None:
    for address in (LOOPBACK, METADATA, OCI_SERVICE):
        assert reaches(unit, address), address
    for address in (*VCN, *OTHER_LINK_LOCAL):
        assert not reaches(unit, address), address


def test_the_fetch_unit_reaches_the_hub_and_object_storage() -> None:
    for address in (HUB, OCI_SERVICE, LOOPBACK):
        assert reaches("gguf-appliance-fetch.service", address), address


def test_the_node_asks_the_secrets_unit_at_start_and_reload_and_the_fetch_waits_for_it() -> None:
    node = unit_directives("gguf-appliance.service")
    start = "+/bin/systemctl start gguf-appliance-secrets.service"
    # First, so a Vault that cannot be read fails the start or reload before the key is staged.
    assert node["ExecStartPre"][0] == start
    assert node["ExecReload"][0] == start
    fetch = unit_directives("gguf-appliance-fetch.service")
    # The fetch's first step too, at every start (automatic restarts included: systemd 255 does
    # not start a Wants= unit again for those), but a Vault that cannot be read ('-') does not
    # stop the fetch of a model that needs no token.
    assert fetch["ExecStartPre"] == ["-" + start]
    assert "gguf-appliance-secrets.service" not in fetch.get("Wants", [])
    secrets = unit_directives("gguf-appliance-secrets.service")
    assert secrets["Type"] == ["oneshot"] and "RemainAfterExit" not in secrets


# --- the Hugging Face token ---


def test_the_hf_token_reaches_the_fetch_unit_alone_as_a_credential() -> None:
    fetch = unit_directives("gguf-appliance-fetch.service")
    # systemd copies the root-only file the secrets unit writes into the fetch unit's credentials
    # directory, readable by its user only; huggingface_hub reads it there.
    assert fetch["LoadCredential"] == [f"hf-token:{DEFAULT_HF_TOKEN_FILE}"]
    assert (
        "HF_TOKEN_PATH=/run/credentials/gguf-appliance-fetch.service/hf-token"
        in (fetch["Environment"])
    )
    # No file (no secret named): a blank line stands in, rather than the unit failing with
    # 243/CREDENTIALS (checked on systemd 249, 252 and 255; an empty value is refused by 252+).
    assert fetch["SetCredential"] == ["hf-token:\\n"]
    secrets = unit_directives("gguf-appliance-secrets.service")
    assert str(DEFAULT_HF_TOKEN_FILE.parent) in secrets["ReadWritePaths"]
    assert secrets["User"] == ["root"] and "DynamicUser" not in secrets
    for unit in UNITS:
        directives = unit_directives(unit)
        if unit != "gguf-appliance-fetch.service":
            assert "LoadCredential" not in directives and "SetCredential" not in directives, unit
            assert not any("HF_TOKEN" in v for v in directives.get("Environment", [])), unit
    # The node runs as the same user as the fetch, whose credentials stay while it stays active
    # (RemainAfterExit). systemd makes /run/credentials inaccessible in every unit with a mount
    # namespace of its own, but for that unit's own credentials (checked on 249, 252 and 255; the
    # boot test reads it from inside the node): the node has one.
    node = unit_directives("gguf-appliance.service")
    assert node["User"] == fetch["User"] and fetch["RemainAfterExit"] == ["yes"]
    assert node["ProtectSystem"] == ["strict"] and node["PrivateMounts"] == ["yes"]


def test_systemd_reads_every_unit_without_a_warning(tmp_path: Path) -> None:
    # This machine's systemd-analyze (252 on Debian 12) parses each rendered unit as systemd
    # would; a line it cannot use (an unknown setting, a bad value, an unknown %-specifier) is
    # "ignoring" on stderr, and the unit would run without it.
    plan = InstallPlan(bin_dir=Path(sys.executable).parent, static_dir=static_dir())
    paths = []
    for path, text in rendered_files(plan).items():
        if path.name in UNITS:
            (tmp_path / path.name).write_text(text)
            paths.append(str(tmp_path / path.name))
    assert len(paths) == len(UNITS)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *paths],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


# --- transient fetch failures at boot ---


def test_the_fetch_unit_retries_within_one_start_before_its_timeout() -> None:
    # A failure that may pass is tried again inside the start (`fetch --retry-for`), so the node's
    # start job, which waits for this one, does not fail with the fetch's first try ("Dependency
    # failed", and nothing starts the node when systemd's restart of the fetch succeeds).
    fetch = unit_directives("gguf-appliance-fetch.service")
    (exec_start,) = fetch["ExecStart"]
    command = exec_start.split()
    assert command[:2] == ["@BIN@/gguf-appliance", "fetch"]
    retry_for = int(command[command.index("--retry-for") + 1])
    assert fetch["TimeoutStartSec"] == ["3h"]
    # At least an hour of tries; and an hour of the start's timeout left for the download.
    assert 3600 <= retry_for <= 3 * 3600 - 3600
    # Restart stays for what one start cannot mend (the Vault's token, or 2 h of failures); never
    # for what will not pass.
    assert fetch["Restart"] == ["on-failure"]
    assert fetch["RestartPreventExitStatus"] == ["1 2"]
    node = unit_directives("gguf-appliance.service")
    assert "gguf-appliance-fetch.service" in " ".join(node["Requires"] + node["After"])
