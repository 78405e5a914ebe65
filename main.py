"""login-etl: SQS login events -> reversible PII masking -> PostgreSQL `user_logins`.

    python main.py                 drain the queue, then exit with a summary
    python main.py --follow        keep consuming until SIGINT/SIGTERM
    python main.py unmask TOKEN... print the original values (needs the key)
    python main.py keygen          print a new MASKING_KEY

Exit codes: 0 ok; 1 unmask failed; 2 configuration or usage error; 3 a service (SQS or
PostgreSQL) unreachable at start; 4 a service lost mid-run beyond the retry budget (nothing
uncommitted was deleted); 130/143 a second SIGINT/SIGTERM cut the run short.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dotenv import load_dotenv

from aws.sqs import QueueNotFound, SqsError, SqsReader
from config import ConfigError, Settings, redact_dsn
from database.sqs_postgres import DatabaseUnavailable, PostgresWriter
from pii.masking import Masker, MaskingError, generate_key
from pipeline import Pipeline, PipelineOptions, ServiceLost

EXIT_OK = 0
EXIT_UNMASK_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_SERVICE_LOST = 4

logger = logging.getLogger("login_etl")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose - args.quiet)
    load_dotenv(Path.cwd() / ".env", override=False)  # the real environment wins
    if args.command == "keygen":
        print(generate_key())
        return EXIT_OK
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    masker = Masker(settings.masking_key)
    if args.command == "unmask":
        return _unmask(masker, args.tokens)
    return _run(settings, masker, args)


def _run(settings: Settings, masker: Masker, args: argparse.Namespace) -> int:
    writer = PostgresWriter(settings.database_url)
    try:
        writer.connect()
    except DatabaseUnavailable as exc:
        print(f"error: PostgreSQL unreachable at {redact_dsn(settings.database_url)}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    wait = args.wait_seconds if args.wait_seconds is not None else (5 if args.follow else 1)
    reader = SqsReader(settings.queue_url, endpoint_url=settings.endpoint_url, region=settings.region,
                       wait_time_seconds=wait)
    try:
        attributes = reader.check()
    except SqsError as exc:
        writer.close()
        print(f"error: SQS queue {settings.queue_url} unusable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    options = PipelineOptions(
        follow=args.follow,
        receivers=args.receivers,
        batch_size=args.batch_size,
        flush_seconds=args.flush_seconds,
        retry_budget_seconds=args.retry_budget_seconds,
        visibility_timeout_seconds=int(attributes.get("VisibilityTimeout", 30)),
        max_receives=_max_receives(args.max_receives, attributes),
    )
    pipeline = Pipeline(reader, writer, masker, options)
    previous = _install_signal_handlers(pipeline)
    try:
        stats = pipeline.run()
    except ServiceLost as exc:
        print(f"error: {exc}; nothing uncommitted was deleted, rerun to resume", file=sys.stderr)
        return EXIT_SERVICE_LOST
    except QueueNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        writer.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(stats.summary())
    return EXIT_OK


def _max_receives(wanted: int, attributes: dict[str, str]) -> int:
    """Quarantine looping messages before SQS would move them to the dead-letter queue."""
    try:
        dlq_after = int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"])
    except (KeyError, ValueError, TypeError):
        return wanted
    return max(1, min(wanted, dlq_after - 1))


def _unmask(masker: Masker, tokens: Sequence[str]) -> int:
    values: list[str] = []
    failed = False
    for position, token in enumerate(tokens, start=1):
        try:
            values.append(masker.unmask(token))
        except MaskingError as exc:
            print(f"error: token {position}: {exc}", file=sys.stderr)
            failed = True
    if failed:
        return EXIT_UNMASK_FAILED  # print nothing rather than a list that no longer lines up
    for value in values:
        print(value)
    return EXIT_OK


def _install_signal_handlers(pipeline: Pipeline) -> dict[int, object]:
    """Route SIGINT/SIGTERM to a graceful stop; return the handlers they replace."""
    def handle(signum: int, _frame: object) -> None:
        if pipeline.stopping:
            # Second signal: leave at once. Uncommitted messages return to the queue later.
            os._exit(128 + signum)
        logger.info("%s received: finishing the batch in hand", signal.Signals(signum).name)
        pipeline.stop()

    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    # No force=True: a host that configured logging already (pytest, an embedding app) keeps it.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(max(level, logging.WARNING))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Consume login events from SQS, mask ip/device_id, store them in PostgreSQL.",
        epilog="Exit codes: 0 ok, 1 unmask failed, 2 configuration/usage error, 3 service unreachable "
        "at start, 4 service lost mid-run beyond the retry budget.",
    )
    parser.add_argument("--follow", action="store_true", help="keep long-polling until SIGINT/SIGTERM")
    parser.add_argument("--receivers", type=_positive_int, default=4, help="concurrent receive threads (4)")
    parser.add_argument("--batch-size", type=_positive_int, default=1000,
                        help="rows per transaction at most (1000)")
    parser.add_argument("--flush-seconds", type=float, default=0.5,
                        help="commit a partial batch once its oldest message is this old (0.5)")
    parser.add_argument("--wait-seconds", type=int, choices=range(0, 21), metavar="0..20", default=None,
                        help="long-poll wait; drain stops at the first empty poll (1 drain, 5 follow)")
    parser.add_argument("--retry-budget-seconds", type=float, default=60.0,
                        help="drain mode: give up after a service is lost this long (60); --follow waits forever")
    parser.add_argument("--max-receives", type=_positive_int, default=5,
                        help="quarantine a message whose processing keeps failing after this many receives "
                        "(5; capped below the queue's RedrivePolicy maxReceiveCount)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    sub = parser.add_subparsers(dest="command", metavar="{unmask,keygen}")
    unmask = sub.add_parser("unmask", help="print the original value of each token, one per line",
                            description="Print the original value of each token, one per line, in order. "
                            "Tokens of ip and device_id are both accepted. Needs MASKING_KEY.")
    unmask.add_argument("tokens", nargs="+", metavar="TOKEN")
    sub.add_parser("keygen", help="print a new random MASKING_KEY",
                   description="Print a new random key (base64 of 64 bytes) for MASKING_KEY.")
    return parser


if __name__ == "__main__":
    sys.exit(main())
