"""The node's load, posted to OCI Monitoring by the real `oci` SDK.

`gguf-appliance oci-metrics` runs as a process of its own beside the node, as its unit does
(systemd/gguf-appliance-oci-metrics.service: the node's unit may reach loopback only), and reads
the node's /metrics. The Monitoring endpoint is a stand-in: a local HTTP server on 127.0.0.1
(tests/oci_stand_in.py) that records what it is sent. The publisher signs with a throwaway API
key from a config file (oci_auth=config_file) instead of instance principals, whose metadata
service and certificates are not stood in here.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import oci_stand_in
from tests.conftest import RunningServer, end_process, slot_held, wait_until
from tests.oci_stand_in import Received, StandIn

COMPARTMENT = "ocid1.compartment.oc1..aaaaaaaastandin"
ACCEPTED = (200, {"failedMetricsCount": 0, "failedMetrics": []})


def publisher_settings(config: Path, url: str, **extra: object) -> dict[str, object]:
    return {
        "oci_auth": "config_file",
        "oci_config_file": config,
        "oci_metrics_compartment": COMPARTMENT,
        "oci_metrics_pool": "test-pool",
        "oci_metrics_resource_id": "ocid1.instance.oc1..node1",
        "oci_monitoring_endpoint": url,
        **extra,
    }


def by_name(request: Received) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in request.body["metricData"]}


class RunningPublisher:
    """`gguf-appliance oci-metrics` in a child process, reading `node`'s /metrics."""

    def __init__(self, node: RunningServer, log_path: Path, settings: dict[str, object]) -> None:
        self.log_path = log_path
        env = {
            **os.environ,
            "GGUF_APPLIANCE_ENV_FILE": "",
            "GGUF_APPLIANCE_HOST": "127.0.0.1",
            "GGUF_APPLIANCE_PORT": str(node.port),
            **{f"GGUF_APPLIANCE_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gguf_appliance.cli", "oci-metrics"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        status = end_process(self.process, signal.SIGTERM)
        self._log.close()
        return status


@pytest.fixture
def start_publisher(tmp_path: Path) -> Iterator[Callable[..., RunningPublisher]]:
    publishers: list[RunningPublisher] = []

    def start(node: RunningServer, **settings: object) -> RunningPublisher:
        log_path = tmp_path / f"publisher-{len(publishers)}.log"
        publisher = RunningPublisher(node, log_path, settings)
        publishers.append(publisher)
        return publisher

    yield start
    for publisher in publishers:
        publisher.stop()


@contextlib.contextmanager
def answering_503(port: int) -> Iterator[list[str]]:
    """A node still loading on `port`: every request gets 503; the paths read, as they come."""
    reads: list[str] = []

    class Loading(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reads.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Loading)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield reads
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def monitoring() -> Iterator[StandIn]:
    with oci_stand_in.running(lambda request: ACCEPTED) as stand_in:
        yield stand_in


def test_the_publisher_posts_the_nodes_load_signed_every_interval(
    tmp_path: Path,
    monitoring: StandIn,
    start_server: Callable[..., RunningServer],
    start_publisher: Callable[..., RunningPublisher],
) -> None:
    config, key_id = oci_stand_in.throwaway_oci_config(tmp_path)
    node = start_server()
    publisher = start_publisher(
        node, **publisher_settings(config, monitoring.url, oci_metrics_interval=0.5)
    )

    with slot_held(node):
        wait_until(
            lambda: any(
                by_name(r)["busy_slots"]["datapoints"][0]["value"] >= 1
                and by_name(r)["tokens_per_second"]["datapoints"][0]["value"] > 0
                for r in monitoring.requests()
            ),
            30,
            "a post showing the busy slot and the tokens it makes",
        )
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    assert httpx.post(node.url("/generate"), json=body, timeout=30).status_code == 200
    wait_until(
        lambda: any("time_to_first_token" in by_name(r) for r in monitoring.requests()),
        30,
        "a post with the answer's time to first token",
    )
    wait_until(lambda: len(monitoring.requests()) >= 6, 30, "six posts")

    posts = monitoring.requests()
    first = posts[0]
    assert (first.method, first.path) == ("POST", "/20180401/metrics")
    # Signed by the SDK with the config file's key (OCI's HTTP signature scheme).
    assert f'keyId="{key_id}"' in first.headers["authorization"]
    assert "x-content-sha256" in first.headers
    busy = None
    for post in posts:
        metrics = by_name(post)
        assert {"busy_slot_ratio", "busy_slots", "queue_depth", "tokens_per_second"} <= set(metrics)
        for metric in metrics.values():
            assert metric["namespace"] == "gguf_appliance"
            assert metric["compartmentId"] == COMPARTMENT
            assert metric["dimensions"] == {
                "resourceId": "ocid1.instance.oc1..node1",
                "pool": "test-pool",
            }
            assert len(metric["datapoints"]) == 1
        if metrics["busy_slots"]["datapoints"][0]["value"] >= 1:
            busy = metrics
    assert busy is not None
    slots = node.metric("gguf_appliance_slots")
    ratio = busy["busy_slot_ratio"]["datapoints"][0]["value"]
    assert ratio == pytest.approx(busy["busy_slots"]["datapoints"][0]["value"] / slots)
    # Time to first token is posted only for the intervals in which an answer began.
    ttfts = [
        by_name(p)["time_to_first_token"] for p in posts if "time_to_first_token" in by_name(p)
    ]
    assert len(ttfts) < len(posts)
    assert all(0 < t["datapoints"][0]["value"] < 30 for t in ttfts)
    # How often: one post per interval (0.5 s), never a burst.
    gaps = [b.at - a.at for a, b in itertools.pairwise(posts)]
    assert min(gaps) > 0.3, gaps
    assert monitoring.most_in_flight == 1
    # SIGTERM (systemctl stop) ends it at once, and cleanly.
    started = time.monotonic()
    assert publisher.stop() == 0
    assert time.monotonic() - started < 5


def test_the_node_itself_posts_nothing_even_with_the_oci_settings(
    tmp_path: Path,
    monitoring: StandIn,
    start_server: Callable[..., RunningServer],
    start_publisher: Callable[..., RunningPublisher],
) -> None:
    # Its unit may reach loopback only: posting is the publisher's, in a unit of its own.
    config, _ = oci_stand_in.throwaway_oci_config(tmp_path)
    settings = publisher_settings(config, monitoring.url, oci_metrics_interval=0.1)
    node = start_server(**settings)
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    assert httpx.post(node.url("/generate"), json=body, timeout=30).status_code == 200
    # A publisher with the same settings, to another stand-in: once it has posted five times,
    # the node has had five of its intervals to post as well.
    with oci_stand_in.running(lambda request: ACCEPTED) as beside:
        start_publisher(node, **{**settings, "oci_monitoring_endpoint": beside.url})
        wait_until(lambda: len(beside.requests()) >= 5, 30, "five posts by the publisher")
    assert monitoring.requests() == []


def test_without_a_compartment_the_publisher_exits_at_once_and_posts_nothing(
    monitoring: StandIn,
    start_server: Callable[..., RunningServer],
    start_publisher: Callable[..., RunningPublisher],
) -> None:
    node = start_server()
    publisher = start_publisher(node, oci_monitoring_endpoint=monitoring.url)
    assert publisher.process.wait(timeout=30) == 0  # the unit's Restart=on-failure: stays off
    assert "the load is not posted" in publisher.log()
    assert monitoring.requests() == []


def test_a_node_not_up_yet_or_gone_gives_no_datapoint_and_no_crash(
    tmp_path: Path,
    monitoring: StandIn,
    start_server: Callable[..., RunningServer],
    start_publisher: Callable[..., RunningPublisher],
) -> None:
    config, _ = oci_stand_in.throwaway_oci_config(tmp_path)
    node = start_server()
    publisher = start_publisher(
        node, **publisher_settings(config, monitoring.url, oci_metrics_interval=0.2)
    )
    wait_until(lambda: len(monitoring.requests()) >= 2, 30, "two posts")
    node.stop()  # a restart of the node: its port answers nothing for a while
    # The publisher has found the node gone (it says so once per outage)...
    wait_until(lambda: "cannot read the node's load" in publisher.log(), 30, "the warning")
    count = len(monitoring.requests())
    # ... and while the node comes back, its port answering 503 (loading), reads it 7 more
    # times and posts no made-up zero load.
    with answering_503(node.port) as reads:
        wait_until(lambda: len(reads) >= 7, 30, "seven reads of a node answering 503")
    assert len(monitoring.requests()) == count
    assert publisher.process.poll() is None


@pytest.mark.parametrize("endpoint", ["hanging", "failing"])
def test_a_hanging_or_failing_monitoring_endpoint_never_affects_serving(
    endpoint: str,
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    start_publisher: Callable[..., RunningPublisher],
) -> None:
    release = threading.Event()

    def answer(request: Received) -> tuple[int, Any]:
        if endpoint == "hanging":
            release.wait(30)
            return ACCEPTED
        return 500, {"code": "InternalServerError", "message": "stand-in failure"}

    with oci_stand_in.running(answer) as monitoring:
        try:
            config, _ = oci_stand_in.throwaway_oci_config(tmp_path)
            node = start_server()
            publisher = start_publisher(
                node,
                **publisher_settings(
                    config, monitoring.url, oci_metrics_interval=0.2, oci_metrics_timeout=0.5
                ),
            )
            wait_until(lambda: len(monitoring.requests()) >= 2, 20, "two posts tried")

            started = time.monotonic()
            ready = httpx.get(node.url("/health/ready"), timeout=5)
            assert ready.status_code == 200
            assert time.monotonic() - started < 1
            body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}
            with httpx.stream("POST", node.url("/generate"), json=body, timeout=30) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("event:")]
            assert events[-1] == "event: done"
            assert node.process.poll() is None
            assert publisher.process.poll() is None

            # One post out at a time: the next starts only once the last one has failed or
            # been given up (after the 0.5 s timeout when the endpoint hangs), so a hanging
            # endpoint holds one connection, never a pile of them.
            posts = monitoring.requests()
            gaps = [b.at - a.at for a, b in itertools.pairwise(posts)]
            assert min(gaps) > (0.45 if endpoint == "hanging" else 0.15), gaps
            log = publisher.log()
            assert log.count("OCI Monitoring: the load was not posted") == 1, log
            reason = "no answer in 0.5 s" if endpoint == "hanging" else "500"
            assert reason in log
        finally:
            release.set()
