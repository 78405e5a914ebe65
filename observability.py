"""What operators see: JSON logs, live progress, Prometheus metrics.

Kept out of main.py (which only wires) and out of pipeline.py (which only moves messages): the
pipeline counts into Stats and reports events to an Observer; this module defines both and turns
them into lines and metrics.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import unicodedata
from bisect import bisect_left, bisect_right
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

import metrics_server
from config import LIVENESS_STALL_SECONDS
from metrics_server import BoundedWsgiServer
from transform import REASON_LABELS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from models import WriteResult
    from transform import Batch

# Structured fields the code attaches with `extra=`; only these reach a JSON line. aws_request_id:
# set on every record by the Lambda runtime's log handler (lambda_handler.py).
LOG_FIELDS = (
    "message_id",
    "reason",
    "batch_size",
    "duration_ms",
    "attempt",
    "count",
    "service",
    "error",
    "aws_request_id",
)


class Observer:
    """Receives pipeline events (for metrics); these defaults do nothing."""

    def on_received(self, count: int, redelivered: int) -> None:
        """A batch of `count` messages, `redelivered` of them seen before, is about to be written."""

    def on_commit(self, batch: Batch, seconds: float, written: WriteResult) -> None:
        """`batch` committed after `seconds` of writing (parsing and masking happen before)."""

    def on_error(self, service: str, kind: str) -> None:
        """A transient `service` ("sqs" or "postgres") error during operation `kind`; retried."""

    def on_writer_turn(self) -> None:
        """The writer went once round its loop (at least every 0.5 s while it waits for messages)."""


@dataclass(slots=True)
class Stats:
    """Counters of one run."""

    received: int = 0
    loaded: int = 0
    rejected: int = 0
    duplicates: int = 0
    redelivered: int = 0
    failed: int = 0
    delete_failures: int = 0
    extended: int = 0
    started: float = field(default_factory=time.monotonic)
    # Receivers, the writer, the deleters and the extender all count: one lock for every update.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to counters by name, atomically (called from several threads)."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        rate = self.received / seconds if seconds > 0 else 0.0
        failed = f", failed {self.failed} (left in the queue)" if self.failed else ""
        if self.delete_failures:
            failed += f", {self.delete_failures} committed but not deleted (redelivered later, stored once)"
        if self.extended:
            failed += f", visibility extended {self.extended} times"
        return (
            f"loaded {self.loaded}, rejected {self.rejected}, duplicates skipped {self.duplicates}{failed} "
            f"in {seconds:.1f} s ({rate:.0f} msgs/s)"
        )


# Characters a terminal or a log reader may act on (C0/C1 controls, bidi and other format characters, line and
# paragraph separators) and lone surrogates, which no terminal encoding can print.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_controls(value: str) -> str:
    """`value` with control and format characters as \\xNN / \\uNNNN escapes and \\ doubled (unambiguous)."""
    shown = []
    for char in value:
        if char in _NAMED_ESCAPES:
            shown.append(_NAMED_ESCAPES[char])
        elif unicodedata.category(char) in _UNSAFE_CATEGORIES:
            code = ord(char)
            shown.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            shown.append(char)
    return "".join(shown)


class TextFormatter(logging.Formatter):
    """The text log: a record's message with control characters escaped, so text a user typed
    (--requested-by, --reason) cannot start a line of its own; a traceback stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        shown = logging.makeLogRecord(record.__dict__)
        shown.message = escape_controls(record.message)
        return super().formatMessage(shown)


# Line breaks that json.dumps(ensure_ascii=False) leaves raw and that str.splitlines and some log
# shippers split on.
_JSON_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message and known structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            if name in record.__dict__:
                data[name] = record.__dict__[name]
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str).translate(_JSON_LINE_BREAKS)


def configure_logging(verbosity: int, log_format: str) -> None:
    """Root logging to stderr; a host that configured logging already (pytest) keeps its handlers."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class Progress:
    """Live progress: a redrawn line on a terminal, a log line every `interval` seconds otherwise."""

    def __init__(
        self,
        stats: Stats,
        queue_depth: Callable[[], int | None],
        *,
        stream: TextIO = sys.stderr,
        interval: float | None = None,
    ) -> None:
        self._stats = stats
        self._queue_depth = queue_depth
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval if interval is not None else (0.5 if self._tty else 10.0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._depth: int | None = None
        self._depth_at = 0.0

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=2)
        if self._tty:
            self._stream.write("\r\033[K")
            self._stream.flush()

    def line(self) -> str:
        s = self._stats
        seconds = max(time.monotonic() - s.started, 1e-9)
        depth = "?" if self._depth is None else f"{self._depth:,}"
        return (
            f"received {s.received:,}  loaded {s.loaded:,}  rejected {s.rejected:,}  "
            f"{s.received / seconds:,.0f} msgs/s  queue ≈ {depth} left"
        )

    def _loop(self) -> None:
        logger = logging.getLogger("login_etl.progress")
        while not self._done.wait(self._interval):
            if time.monotonic() - self._depth_at >= max(2.0, self._interval):
                self._depth_at = time.monotonic()
                try:
                    self._depth = self._queue_depth()
                except Exception:  # noqa: BLE001 - progress must never break a run
                    self._depth = None
            if self._tty:
                self._stream.write("\r\033[K" + self.line())
                self._stream.flush()
            else:
                logger.info("progress: %s", self.line())


class Health:
    """What the Kubernetes probes ask, answered from memory: never a call to PostgreSQL or SQS.

    Live: still starting, or the consume loop moved in the last `stall_seconds`: the writer went
    round its loop (at least every 0.5 s while idle) or a call failed and is being retried. An
    outage of PostgreSQL or SQS therefore counts as alive (a restart would not bring the service
    back, and would only add connection storms); only a loop stuck in one call that long is not.
    Ready: the consume loop runs and is not stopping.
    """

    def __init__(
        self, stall_seconds: float = LIVENESS_STALL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stall_seconds = stall_seconds
        self._clock = clock
        self._last_beat = clock()
        self._stopping: Callable[[], bool] | None = None

    def beat(self) -> None:
        """The loop moved (a turn of the writer, or a retried call)."""
        self._last_beat = self._clock()

    def running(self, stopping: Callable[[], bool]) -> None:
        """The consume loop starts now; `stopping` says when it has been told to stop."""
        self.beat()
        self._stopping = stopping

    def live(self) -> tuple[bool, str]:
        if self._stopping is None:
            return True, "starting"
        idle = self._clock() - self._last_beat
        if idle > self._stall_seconds:
            return False, f"stalled: the consume loop has not moved for {idle:.0f} s"
        return True, f"ok: the consume loop moved {idle:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        if self._stopping is None:
            return False, "starting"
        if self._stopping():
            return False, "stopping: finishing the batch in hand"
        return True, "ready"


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
