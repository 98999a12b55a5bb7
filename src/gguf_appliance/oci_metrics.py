"""The node's load, posted to OCI Monitoring as custom metrics for the pool's autoscaling.

`gguf-appliance oci-metrics` runs beside the node, in a unit of its own
(systemd/gguf-appliance-oci-metrics.service): the node's unit may reach loopback only, while
posting needs the metadata service (instance principals) and OCI's public endpoints. Every
`interval` seconds it reads the node's /metrics on loopback (busy slots, slots, queue depth,
tokens generated, time to first token) and posts one datapoint per metric. Each post runs in a
thread of its own and is waited for at most `timeout` seconds; while one is still out, no other
starts, so a hanging endpoint holds one thread and nothing else. A failed post is logged (once
until a post succeeds again) and its datapoints dropped: the load of a minute ago is of no use
to autoscaling. While the node cannot be read (starting, restarting) nothing is posted.

Metrics, in the namespace (`gguf_appliance` by default) and the compartment given, each with
the dimensions `resourceId` (the instance's OCID) and `pool`:

- `busy_slot_ratio`: busy slots over slots, 0 to 1;
- `busy_slots`: slots generating or reading a prompt (streams in flight);
- `queue_depth`: requests waiting for a slot;
- `tokens_per_second`: tokens generated since the last sample, per second;
- `time_to_first_token`: mean seconds to the first token of the requests whose first token came
  since the last sample (no datapoint when none did).
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .oci_auth import OciCredentials, client_options, import_oci, oci_credentials
from .settings import Settings

log = logging.getLogger("gguf_appliance.oci_metrics")

METRIC_NAMES = (
    "busy_slot_ratio",
    "busy_slots",
    "queue_depth",
    "tokens_per_second",
    "time_to_first_token",
)


@dataclass(frozen=True)
class LoadSample:
    busy_slots: int
    slots: int
    queue_depth: int
    tokens_per_second: float
    time_to_first_token: float | None

    def values(self) -> dict[str, float]:
        values = {
            "busy_slot_ratio": self.busy_slots / self.slots if self.slots else 0.0,
            "busy_slots": float(self.busy_slots),
            "queue_depth": float(self.queue_depth),
            "tokens_per_second": self.tokens_per_second,
        }
        if self.time_to_first_token is not None:
            values["time_to_first_token"] = self.time_to_first_token
        return values


@dataclass(frozen=True)
class NodeCounters:
    """What the node's /metrics says at one moment; rates come from two of these."""

    busy_slots: int
    slots: int
    queue_depth: int
    completion_tokens: float
    ttft_sum: float
    ttft_count: float


_SCRAPED = {
    "gguf_appliance_busy_slots": "busy_slots",
    "gguf_appliance_slots": "slots",
    "gguf_appliance_queue_depth": "queue_depth",
    "gguf_appliance_completion_tokens_total": "completion_tokens",
    "gguf_appliance_time_to_first_token_seconds_sum": "ttft_sum",
    "gguf_appliance_time_to_first_token_seconds_count": "ttft_count",
}


def parse_counters(text: str) -> NodeCounters:
    """The counters in a /metrics page (Prometheus text); a missing one is an error."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _SCRAPED:
                found[_SCRAPED[sample.name]] = sample.value
    missing = sorted(set(_SCRAPED.values()) - set(found))
    if missing:
        raise ValueError(f"the node's /metrics lacks {', '.join(missing)}")
    return NodeCounters(
        busy_slots=int(found["busy_slots"]),
        slots=int(found["slots"]),
        queue_depth=int(found["queue_depth"]),
        completion_tokens=found["completion_tokens"],
        ttft_sum=found["ttft_sum"],
        ttft_count=found["ttft_count"],
    )


def node_counters(url: str, timeout: float) -> Callable[[], NodeCounters]:
    """Reads the node's /metrics at `url` (loopback: the node's unit answers nothing else)."""

    # Straight to the node: an https_proxy set for OCI's endpoints must not carry this.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def read() -> NodeCounters:
        with opener.open(url, timeout=timeout) as response:
            return parse_counters(response.read().decode("utf-8"))

    return read


class LoadSampler:
    """Reads the node's counters; rates are over the time since the last read."""

    def __init__(self, read: Callable[[], NodeCounters]) -> None:
        self.read = read
        self._last: tuple[float, NodeCounters] | None = None

    def sample(self) -> LoadSample | None:
        """The load now; None at the first read (no rate yet) or when the node cannot be read
        (not up yet, restarting): no datapoint is better than a made-up zero."""
        now = time.monotonic()
        try:
            counters = self.read()
        except (OSError, ValueError) as exc:
            if self._last is not None:
                log.warning("OCI Monitoring: cannot read the node's load: %s", exc)
            self._last = None
            return None
        last, self._last = self._last, (now, counters)
        if last is None:
            return None
        then, before = last
        elapsed = now - then
        tokens = counters.completion_tokens - before.completion_tokens
        started = counters.ttft_count - before.ttft_count
        return LoadSample(
            busy_slots=counters.busy_slots,
            slots=counters.slots,
            queue_depth=counters.queue_depth,
            # A restarted node's counters start again from 0: no negative rate.
            tokens_per_second=max(0.0, tokens / elapsed) if elapsed > 0 else 0.0,
            time_to_first_token=(counters.ttft_sum - before.ttft_sum) / started
            if started > 0
            else None,
        )


@dataclass(frozen=True)
class MetricsTarget:
    """Where the datapoints go and what they are tagged with."""

    namespace: str
    compartment_id: str
    resource_id: str
    pool: str

    def metric_data(self, sample: LoadSample, at: datetime.datetime) -> list[Any]:
        models = import_oci().monitoring.models
        dimensions = {"resourceId": self.resource_id, "pool": self.pool}
        return [
            models.MetricDataDetails(
                namespace=self.namespace,
                compartment_id=self.compartment_id,
                name=name,
                dimensions=dimensions,
                datapoints=[models.Datapoint(timestamp=at, value=value, count=1)],
            )
            for name, value in sample.values().items()
        ]


def monitoring_poster(
    credentials: Callable[[], OciCredentials], endpoint: str | None, timeout: float
) -> Callable[[list[Any]], None]:
    """A function posting metric data with the SDK; the client is made at the first post (so
    instance principals ask the metadata service from the publisher's thread, not at start)."""
    client: Any = None

    def post(metric_data: list[Any]) -> None:
        nonlocal client
        oci = import_oci()
        if client is None:
            creds = credentials()
            # Posting goes to telemetry-ingestion, not the client's default (query) endpoint.
            url = endpoint or f"https://telemetry-ingestion.{creds.region}.oraclecloud.com"
            client = oci.monitoring.MonitoringClient(
                creds.config, **client_options(creds, url, timeout)
            )
        details = oci.monitoring.models.PostMetricDataDetails(metric_data=metric_data)
        response = client.post_metric_data(details)
        failed = getattr(response.data, "failed_metrics_count", 0) or 0
        if failed:
            raise RuntimeError(f"{failed} metric(s) refused: {response.data.failed_metrics}")

    return post


class LoadPublisher:
    """Samples every `interval` seconds and posts, each post bounded by `timeout` seconds."""

    def __init__(
        self,
        sampler: LoadSampler,
        target: MetricsTarget,
        post: Callable[[list[Any]], None],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self.sampler = sampler
        self.target = target
        self.post = post
        self.interval = interval
        self.timeout = timeout
        self.posted = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oci-metrics", daemon=True)
        self._inflight: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 1)

    def run_until(self, stop: threading.Event) -> None:
        """Publish in the calling thread until `stop` is set (the CLI's SIGTERM)."""
        self._stop = stop
        self._run()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish_once()
            except Exception:  # a bug here must not end the thread or touch serving
                log.exception("OCI Monitoring: sampling the load failed")

    def publish_once(self) -> None:
        sample = self.sampler.sample()
        if sample is None:
            return
        if self._inflight is not None and self._inflight.is_alive():
            self._failed("the last post has not returned")
            return
        data = self.target.metric_data(sample, datetime.datetime.now(datetime.timezone.utc))
        outcome: list[BaseException | None] = []

        def send() -> None:
            try:
                self.post(data)
                outcome.append(None)
            except BaseException as exc:  # reported by the publisher's thread
                outcome.append(exc)

        self._inflight = threading.Thread(target=send, name="oci-metrics-post", daemon=True)
        self._inflight.start()
        self._inflight.join(self.timeout)
        if not outcome:
            self._failed(f"no answer in {self.timeout:g} s")
        elif outcome[0] is not None:
            self._failed(_brief(outcome[0]))
        else:
            self.posted += 1
            if self._failing:
                log.info("OCI Monitoring: posting the load again")
            self._failing = False

    def _failed(self, reason: str) -> None:
        self.failed += 1
        if not self._failing:
            log.warning(
                "OCI Monitoring: the load was not posted (%s); trying every %g s",
                reason,
                self.interval,
            )
        self._failing = True


def _brief(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None) or str(exc)
    return (
        f"{type(exc).__name__} {status}: {message}"
        if status
        else f"{type(exc).__name__}: {message}"
    )


def instance_id(timeout: float = 2.0) -> str | None:
    """This instance's OCID from the metadata service (v2), or None off OCI."""
    request = urllib.request.Request(
        "http://169.254.169.254/opc/v2/instance/id", headers={"Authorization": "Bearer Oracle"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return str(response.read().decode().strip()) or None
    except OSError:
        return None


def node_metrics_url(settings: Settings) -> str:
    """The node's /metrics as seen from this machine (a wildcard address: loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/metrics"


def load_publisher(settings: Settings) -> LoadPublisher:
    """The publisher the settings describe (oci_metrics_compartment set), reading the node at
    its host and port; not started. Blocks up to 2 s asking the metadata service for the
    instance's OCID unless it is given."""
    assert settings.oci_metrics_compartment is not None
    resource_id = settings.oci_metrics_resource_id
    if resource_id is None and settings.oci_auth == "instance_principal":
        resource_id = instance_id()
    target = MetricsTarget(
        namespace=settings.oci_metrics_namespace,
        compartment_id=settings.oci_metrics_compartment,
        resource_id=resource_id or socket.gethostname(),
        pool=settings.oci_metrics_pool,
    )

    def credentials() -> OciCredentials:
        return oci_credentials(
            settings.oci_auth,
            config_file=settings.oci_config_file,
            profile=settings.oci_config_profile,
            region=settings.oci_region,
        )

    post = monitoring_poster(
        credentials, settings.oci_monitoring_endpoint, settings.oci_metrics_timeout
    )
    return LoadPublisher(
        LoadSampler(node_counters(node_metrics_url(settings), settings.oci_metrics_timeout)),
        target,
        post,
        interval=settings.oci_metrics_interval,
        timeout=settings.oci_metrics_timeout,
    )
