"""Prometheus metrics of a running ETL, fed by the pipeline's events, served with the probes."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import metrics_server
from etl.observability import Observer
from etl.probes import Health
from etl.transform import REASON_LABELS
from metrics_server import BoundedWsgiServer

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from etl.batch import Batch
    from models import WriteResult

# Every interface: in a container the scraper reaches the pod's address. --metrics-address (or
# METRICS_ADDRESS) narrows it, e.g. to 127.0.0.1 on a host.
DEFAULT_METRICS_ADDRESS = "0.0.0.0"  # noqa: S104


# Label values created at start, so that every series exists (at 0) before its first event: a
# dashboard panel or an alert on them then has data from the first scrape. The `kind`s are the
# Retrier's operations (pipeline.py).
ERROR_KINDS = {"sqs": ("receive", "delete"), "postgres": ("write",)}


# Seconds from SQS accepting a message to its commit: from sub-second (live) to a day (a backlog).
FRESHNESS_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class BatchHistogram:
    """A Prometheus histogram observed a batch of values at a time.

    prometheus_client's Histogram takes one value per call, each under its lock and a Python loop
    over the buckets: several milliseconds for the 1,000 freshness values of one batch, on the
    writer thread. This one sorts the batch (in C) and counts each bucket with one bisection.
    Negative values (a clock behind SQS's) count as 0.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(buckets)
        self._cumulative = [0] * (len(self._bounds) + 1)  # values <= each bound, then all (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        ordered = sorted(values)
        total = sum(ordered[bisect_left(ordered, 0.0) :])
        counts = [bisect_right(ordered, bound) for bound in self._bounds] + [len(ordered)]
        with self._lock:
            self._cumulative = [a + b for a, b in zip(self._cumulative, counts, strict=True)]
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        with self._lock:
            cumulative, total = list(self._cumulative), self._sum
        les = [floatToGoString(bound) for bound in [*self._bounds, float("inf")]]
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=list(zip(les, cumulative, strict=True)), sum_value=total
        )


class Metrics(Observer):
    """Prometheus metrics of a running ETL, fed by pipeline events; served on a port with the probes
    (`/livez`, `/readyz`: see Health).

    Every metric, its labels and its meaning: docs/operations-monitoring.md. Labels are bounded:
    `reason` is one of transform.REASON_LABELS, `service`/`kind` those of ERROR_KINDS.
    """

    def __init__(self, health: Health | None = None, clock: Callable[[], float] = time.time) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._clock = clock
        self.health = health or Health()
        self.registry = CollectorRegistry()
        self.received = Counter("login_etl_messages_received", "Messages received from SQS", registry=self.registry)
        self.loaded = Counter("login_etl_messages_loaded", "Rows inserted into user_logins", registry=self.registry)
        self.rejected = Counter(
            "login_etl_messages_rejected", "Messages quarantined, by kind of reason", ["reason"], registry=self.registry
        )
        self.redelivered = Counter(
            "login_etl_messages_redelivered", "Messages received more than once", registry=self.registry
        )
        self.batch_size = Histogram(
            "login_etl_batch_size",
            "Messages per committed batch",
            registry=self.registry,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
        )
        self.batch_seconds = Histogram(
            "login_etl_batch_seconds",
            "Write and commit time of a batch (retries included)",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.freshness = BatchHistogram(
            "login_etl_freshness_seconds",
            "Commit time minus SQS SentTimestamp, per committed message",
            FRESHNESS_BUCKETS,
            self.registry,
        )
        self.oldest_age = Gauge(
            "login_etl_oldest_message_age_seconds",
            "Age (now minus SentTimestamp) of the oldest message of the last committed batch",
            registry=self.registry,
        )
        self.errors = Counter(
            "login_etl_errors", "Service errors by service and kind", ["service", "kind"], registry=self.registry
        )
        self.last_commit = Gauge(
            "login_etl_last_commit_timestamp_seconds", "Unix time of the last commit", registry=self.registry
        )
        self.queue_depth = Gauge(
            "login_etl_queue_depth", "ApproximateNumberOfMessages as last seen", registry=self.registry
        )
        for reason in REASON_LABELS:
            self.rejected.labels(reason=reason)
        for service, kinds in ERROR_KINDS.items():
            for kind in kinds:
                self.errors.labels(service=service, kind=kind)

    def serve(self, port: int, address: str = DEFAULT_METRICS_ADDRESS) -> BoundedWsgiServer:
        """Serve wsgi_app() on address:port from a daemon thread (a small pool, a deadline per request:
        metrics_server.py); raise OSError if it cannot bind."""
        return metrics_server.serve(self.wsgi_app(), port, address)

    def wsgi_app(self) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
        """/livez and /readyz (200 or 503, one line of text; see Health), the metrics on any other path."""
        from prometheus_client import make_wsgi_app

        metrics_app = make_wsgi_app(self.registry)
        probes = {"/livez": self.health.live, "/readyz": self.health.ready}

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            probe = probes.get(environ.get("PATH_INFO", ""))
            if probe is None:
                return metrics_app(environ, start_response)
            ok, text = probe()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
            )
            return [text.encode() + b"\n"]

        return app

    # -- pipeline events ------------------------------------------------------------------------

    def on_received(self, count: int, redelivered: int) -> None:
        self.received.inc(count)
        self.redelivered.inc(redelivered)

    def on_commit(self, batch: Batch, seconds: float, written: WriteResult) -> None:
        now = self._clock()
        self.batch_size.observe(len(batch.messages))
        self.batch_seconds.observe(seconds)
        self.loaded.inc(written.inserted)
        kinds = Tally(
            batch.rejections[message_id].kind for message_id in written.rejected_ids if message_id in batch.rejections
        )
        for kind, count in kinds.items():
            self.rejected.labels(reason=kind).inc(count)
        # Freshness of every message the transaction stored or quarantined (once per message id,
        # whichever copy): the analyst's "how stale is user_logins?".
        sent = {m.message_id: m.sent_timestamp_ms for m in batch.deletable() if m.sent_timestamp_ms is not None}
        if sent:
            self.freshness.observe_many([now - sent_ms / 1000 for sent_ms in sent.values()])
            self.oldest_age.set(max(0.0, now - min(sent.values()) / 1000))
        self.last_commit.set(now)

    def on_error(self, service: str, kind: str) -> None:
        self.errors.labels(service=service, kind=kind).inc()
        self.health.beat()  # retrying is alive: an outage must not get the pod restarted

    def on_writer_turn(self) -> None:
        self.health.beat()
