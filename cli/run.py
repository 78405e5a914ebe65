"""The run: `python main.py` drains the queue, `python main.py --follow` keeps consuming.

The run is the command without a subcommand, so its options sit on the top-level parser; each is a
RunOption, which the parser refuses before a subcommand.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from aws.queue_attributes import max_message_bytes, max_receives, visibility_timeout_seconds
from aws.sqs import SqsReader
from cli.arguments import RunOption, UsageError, byte_count, port, positive_int, seconds
from cli.exit_codes import EXIT_OK, EXIT_SIGNAL_BASE, ErrorContext
from cli.startup import DEFAULT_RETRY_BUDGET_SECONDS, load_keys, set_up_schema
from config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DELETERS,
    DEFAULT_FLUSH_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BYTES_IN_HAND,
    DEFAULT_RECEIVERS,
    DEFAULT_STOP_TIMEOUT_SECONDS,
    MIN_MAX_BODY_BYTES,
    MIN_MAX_BYTES_IN_HAND,
    SQS_MAX_MESSAGE_BYTES,
    ConfigError,
    PipelineOptions,
    Settings,
)
from database.sqs_postgres import PostgresWriter
from database.token_indexes import TokenIndexer
from etl.metrics import DEFAULT_METRICS_ADDRESS, Metrics
from etl.observability import Progress
from etl.pipeline import Pipeline, Stopped
from models import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS, Backoff
from pii.masking import Masker

logger = logging.getLogger(__name__)

# What signal.signal() takes and returns (typeshed's alias for it is private).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# glibc's mallopt parameter: allocations from this size up are mmap'd, so freed ones go back at once.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024


def register_options(parser: argparse.ArgumentParser) -> None:
    """The run's options, on the top-level parser (the run is the command without a subcommand)."""
    group = parser.add_argument_group("run options (no subcommand)")

    def option(flag: str, **kwargs: Any) -> None:
        group.add_argument(flag, action=RunOption, **kwargs)

    option("--follow", nargs=0, const=True, default=False, help="keep long-polling until SIGINT/SIGTERM")
    option(
        "--receivers",
        type=positive_int,
        default=DEFAULT_RECEIVERS,
        help=f"concurrent receive threads ({DEFAULT_RECEIVERS})",
    )
    option(
        "--deleters",
        type=positive_int,
        default=DEFAULT_DELETERS,
        help=f"concurrent DeleteMessageBatch calls after each commit ({DEFAULT_DELETERS})",
    )
    option(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per transaction at most ({DEFAULT_BATCH_SIZE})",
    )
    option(
        "--flush-seconds",
        type=seconds(allow_zero=True),
        default=DEFAULT_FLUSH_SECONDS,
        help=f"commit a partial batch once its oldest message is this old ({DEFAULT_FLUSH_SECONDS})",
    )
    option(
        "--wait-seconds",
        type=int,
        choices=range(0, 21),
        metavar="0..20",
        default=None,
        help="long-poll wait; drain stops at the first empty poll (1 drain, 5 follow)",
    )
    _register_retries(option)
    _register_limits(option)


def _register_retries(option: Callable[..., None]) -> None:
    option(
        "--retry-budget-seconds",
        type=seconds(allow_zero=True),
        default=DEFAULT_RETRY_BUDGET_SECONDS,
        help=f"drain mode: give up after a service is lost this long ({DEFAULT_RETRY_BUDGET_SECONDS:.0f}); "
        "--follow waits forever",
    )
    option(
        "--stop-timeout",
        type=seconds(allow_zero=True),
        default=DEFAULT_STOP_TIMEOUT_SECONDS,
        metavar="S",
        help="on SIGINT/SIGTERM, keep retrying the batch in hand this long, then exit leaving it "
        f"uncommitted ({DEFAULT_STOP_TIMEOUT_SECONDS:.0f}; below a 30 s grace period)",
    )
    option(
        "--backoff-base-seconds",
        type=seconds(allow_zero=False),
        default=DEFAULT_BASE_SECONDS,
        metavar="S",
        help=f"first retry waits up to this long, doubling per failure ({DEFAULT_BASE_SECONDS})",
    )
    option(
        "--backoff-cap-seconds",
        type=seconds(allow_zero=False),
        default=DEFAULT_CAP_SECONDS,
        metavar="S",
        help=f"longest wait between retries ({DEFAULT_CAP_SECONDS:.0f})",
    )


def _register_limits(option: Callable[..., None]) -> None:
    option(
        "--max-receives",
        type=positive_int,
        default=5,
        help="quarantine a message whose processing keeps failing after this many receives "
        "(5; capped below the queue's RedrivePolicy maxReceiveCount)",
    )
    option(
        "--max-body-bytes",
        type=byte_count(MIN_MAX_BODY_BYTES),
        default=None,
        metavar="BYTES",
        help="quarantine larger bodies unparsed, keeping a 4 KiB encrypted prefix, the length and the "
        f"SHA-256 (MAX_BODY_BYTES, else {DEFAULT_MAX_BODY_BYTES}; units KiB, MiB)",
    )
    option(
        "--max-bytes-in-hand",
        type=byte_count(MIN_MAX_BYTES_IN_HAND),
        default=None,
        metavar="BYTES",
        help="bound on the bytes in hand (answers being read, bodies not yet committed); receivers wait at it "
        f"(MAX_BYTES_IN_HAND, else {DEFAULT_MAX_BYTES_IN_HAND // 1_048_576}MiB; at least 10MiB)",
    )
    option(
        "--metrics-port",
        type=port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port, with the probes /livez and /readyz (off by default)",
    )
    option(
        "--metrics-address",
        default=None,
        metavar="ADDR",
        help=f"the address to serve metrics and probes on (METRICS_ADDRESS, else {DEFAULT_METRICS_ADDRESS}: "
        "every interface); e.g. 127.0.0.1 on a host",
    )
    option(
        "--progress-seconds",
        type=seconds(allow_zero=False),
        default=None,
        metavar="S",
        help="progress interval (0.5 s redrawn on a terminal, else a log line every 10 s)",
    )


def run(args: argparse.Namespace, context: ErrorContext) -> int:
    """Drain the queue (or, with --follow, consume until a signal); print the summary."""
    if args.backoff_base_seconds > args.backoff_cap_seconds:
        raise UsageError("--backoff-base-seconds must not exceed --backoff-cap-seconds")
    settings, masker = load_keys(context)
    context.stop_timeout = f"{args.stop_timeout:g}"
    address = args.metrics_address or os.environ.get("METRICS_ADDRESS") or DEFAULT_METRICS_ADDRESS
    metrics = _serve_metrics(args.metrics_port, address)
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    # The analysts' token indexes on the closed days, built beside the writer (never in its path) on
    # a connection of their own, from the schema set-up on; a stop cancels the build in flight and
    # does not wait for it (its leftover is dropped and built again next time).
    indexer = TokenIndexer(settings.database_url)
    close = True
    try:
        return _consume(writer, indexer, settings, masker, args, metrics)
    except Stopped as exc:
        # A write still hangs inside the connection (a half-open socket): closing it would wait
        # for that call. The process exits instead, and the OS drops the socket.
        close = not exc.hung
        raise
    finally:
        indexer.stop()
        if close:
            writer.close()


def _backoff(args: argparse.Namespace) -> Backoff:
    """The one retry policy of the run: the loop builds the same from PipelineOptions."""
    return Backoff(args.backoff_base_seconds, args.backoff_cap_seconds)


def _serve_metrics(port: int | None, address: str) -> Metrics | None:
    """Metrics and the probes on address:`port` (None: not served); a busy port is a ConfigError.

    Served before connecting, so that a liveness probe is answered while the ETL starts.
    """
    if port is None:
        return None
    metrics = Metrics()
    try:
        metrics.serve(port, address)
    except OSError as exc:  # typically EADDRINUSE; nothing has been received yet
        raise ConfigError(
            f"--metrics-port {port} --metrics-address {address}: cannot serve metrics there "
            f"({exc.strerror}); choose a free port and an address of this host"
        ) from None
    logger.info("serving Prometheus metrics on %s:%d/metrics, probes on /livez and /readyz", address, port)
    return metrics


def _return_large_blocks_to_the_system() -> None:
    """Fix glibc's mmap threshold at its default, 128 KiB (unless MALLOC_MMAP_THRESHOLD_ sets one).

    Left dynamic, glibc raises it to the size of the first large block freed (a receive of 1 MiB
    bodies: ~10 MB), and later large bodies come from the threads' heaps, which keep their memory:
    measured over 1 MiB bodies, peak RSS 190 MB without this, 155 MB with it. No effect off glibc.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): its allocator decides


def _consume(
    writer: PostgresWriter,
    indexer: TokenIndexer,
    settings: Settings,
    masker: Masker,
    args: argparse.Namespace,
    metrics: Metrics | None,
) -> int:
    _return_large_blocks_to_the_system()
    set_up_schema(
        writer,
        backoff=_backoff(args),
        budget_seconds=None if args.follow else args.retry_budget_seconds,
        dsn=settings.database_url,
    )
    indexer.start()  # after the schema set-up: a schema 4 is migrated first
    wait = args.wait_seconds if args.wait_seconds is not None else (5 if args.follow else 1)
    reader = SqsReader(
        settings.queue_url,
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        wait_time_seconds=wait,
        transport=settings.sqs_client,
        ca_bundle=settings.ca_bundle,
    )
    pipeline = Pipeline(reader, writer, masker, _options(args, settings, reader.check()), observer=metrics)

    def queue_depth() -> int:
        depth = int(reader.check().get("ApproximateNumberOfMessages", 0))
        if metrics is not None:
            metrics.queue_depth.set(depth)
        return depth

    previous = _install_signal_handlers(pipeline)
    if metrics is not None:
        metrics.health.running(lambda: pipeline.stopping)
    try:
        with Progress(pipeline.stats, queue_depth, interval=args.progress_seconds):
            stats = pipeline.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(stats.summary())
    return EXIT_OK


def _options(args: argparse.Namespace, settings: Settings, attributes: dict[str, str]) -> PipelineOptions:
    """The loop's options: the flags, the environment's defaults, and the queue's own attributes."""
    return PipelineOptions(
        follow=args.follow,
        receivers=args.receivers,
        deleters=args.deleters,
        batch_size=args.batch_size,
        flush_seconds=args.flush_seconds,
        retry_budget_seconds=args.retry_budget_seconds,
        stop_timeout_seconds=args.stop_timeout,
        backoff_base_seconds=args.backoff_base_seconds,
        backoff_cap_seconds=args.backoff_cap_seconds,
        visibility_timeout_seconds=visibility_timeout_seconds(attributes),
        max_receives=max_receives(args.max_receives, attributes),
        max_body_bytes=args.max_body_bytes or settings.max_body_bytes,
        max_bytes_in_hand=args.max_bytes_in_hand or settings.max_bytes_in_hand,
        max_message_bytes=max_message_bytes(attributes, quota=SQS_MAX_MESSAGE_BYTES),
        fifo=attributes.get("FifoQueue") == "true",
    )


def _install_signal_handlers(pipeline: Pipeline) -> dict[int, SignalHandler]:
    """Route SIGINT/SIGTERM to a graceful stop; return the handlers they replace."""

    def handle(signum: int, _frame: object) -> None:
        if pipeline.stopping:
            # Second signal: leave at once. Uncommitted messages return to the queue later.
            os._exit(EXIT_SIGNAL_BASE + signum)
        logger.info("%s received: finishing the batch in hand", signal.Signals(signum).name)
        pipeline.stop()

    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
