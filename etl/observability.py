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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from etl.batch import Batch
    from models import WriteResult

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
