"""login-etl: SQS login events -> reversible PII masking -> PostgreSQL `user_logins`.

    python main.py                 drain the queue, then exit with a summary
    python main.py --follow        keep consuming until SIGINT/SIGTERM
    python main.py unmask --reason TEXT TOKEN...  print the original values (needs the key; audited)
    python main.py keygen [--kms-key-id ID]       print a new MASKING_KEY (or a KMS-wrapped one)
    python main.py keygen --format tink [--export | --rotate]  a Tink JSON keyset (new, or of the keyring)
    python main.py rekey           rewrite stored tokens of older key versions under the active one
    python main.py backfill-networks  give rows stored before schema 7 their network token (needs the key)
    python main.py replay --reason TEXT [--dry-run]  load quarantined messages that now pass (audited)
    python main.py check           check configuration and services, as a checklist
    python main.py retention --keep-days N [--dry-run]   drop daily partitions older than N days (audited)
    python main.py snapshot        nightly: the closed days' token indexes, then refresh the analysts'
                                   all-time snapshot user_login_duplicates_snapshot

Exit codes: EXIT_CODES below (printed by --help; the table in docs/operations.md says the same,
checked by tests/unit/test_docs.py).
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # An orchestrator may stop a replica while it is still starting (importing boto3 takes half a
    # second): until the pipeline's own handlers are in place nothing has been received, so a
    # SIGTERM ends the start cleanly, exit 0, instead of killing the process by the signal.
    def _stopped_while_starting(signum: int, frame: object) -> None:
        sys.stderr.write(f"{signal.Signals(signum).name} received while starting: nothing received yet, exiting\n")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stopped_while_starting)

import argparse
import ctypes
import getpass
import json
import logging
import math
import os
import re
import resource
import secrets
import textwrap
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from dotenv import dotenv_values

from aws.sqs import SqsError, SqsReader
from config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DELETERS,
    DEFAULT_FLUSH_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BYTES_IN_HAND,
    DEFAULT_RECEIVERS,
    DEFAULT_STOP_TIMEOUT_SECONDS,
    KEY_SOURCES,
    MIN_MAX_BODY_BYTES,
    MIN_MAX_BYTES_IN_HAND,
    SQS_MAX_MESSAGE_BYTES,
    ConfigError,
    KmsSettings,
    PipelineOptions,
    Settings,
    database_url_from_env,
    parse_bytes,
    redact_dsn,
)
from database import key_checks
from database.audit import AuditLog, AuditUnavailable
from database.audit_tables import AuditTableUnsafe
from database.errors import DatabaseError, DatabaseUnavailable, SchemaBusy
from database.network_backfill import BackfillInterrupted, NetworkBackfill
from database.rekey import Rekeyer, RekeyInterrupted
from database.replay import Replayer, ReplayInterrupted, ReplayNotAudited, ReplayRequest
from database.retention import MIN_KEEP_DAYS, Retention
from database.schema import SCHEMA_VERSION
from database.snapshot import SnapshotBusy, SnapshotLockTimeout, SnapshotRefresher
from database.sqs_postgres import PostgresWriter
from database.token_indexes import TokenIndexer, nightly_pass
from health import Failure, checklist_from_env
from models import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS, Backoff, UnmaskAudit
from observability import DEFAULT_METRICS_ADDRESS, Metrics, Progress, configure_logging, escape_controls
from pii.encoding import canonical_spelling
from pii.key_files import write_key_file
from pii.keys import KmsUnavailable, generate_wrapped_key
from pii.masking import KEY_BYTES, Masker, MaskingError, generate_key, token_version
from pii.tink_keyset import keyset_json, new_key_id
from pipeline import Pipeline, QueueLost, ServiceLost, Stopped
from retry import BudgetExhausted, Retrier, StopState
from transform import retry_quarantined

EXIT_OK = 0
EXIT_UNMASK_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_SERVICE_LOST = 4
EXIT_STOPPED_UNCOMMITTED = 5
EXIT_QUEUE_LOST = 6
EXIT_BUSY = 7
EXIT_SIGNAL_BASE = 128  # + the signal's number
EXIT_PIPE_CLOSED = EXIT_SIGNAL_BASE + signal.SIGPIPE  # 141, as a shell reports a process SIGPIPE ended
# The one list of exit codes: --help prints it, and docs/operations.md's table says exactly the same
# (tests/unit/test_docs.py), with the 128+N row below.
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_UNMASK_FAILED: "`unmask` failed (a token that does not decrypt under the keys held, or made by a different "
    "key with its version), or `rekey` left tokens it cannot rewrite, or `backfill-networks` left rows without a "
    "network token (an ip token of a key not held)",
    EXIT_CONFIG: "configuration or usage error: no or several key sources, a key that does not load (a KMS refusal, "
    "one key under two versions, a refused key file), a key version the database records with another key, a "
    "`DATABASE_URL` libpq cannot parse, a flag value out of range or a busy `--metrics-port`, `unmask` without "
    "`--reason`, `keygen --output` onto an existing file without `--replace`, `retention` or `snapshot` refused "
    "by PostgreSQL (schema not migrated yet, not the owner); nothing is consumed",
    EXIT_UNREACHABLE: "SQS, PostgreSQL or KMS unreachable at start (nothing is consumed), or `unmask` could not "
    "write its audit row, or `retention` or `snapshot` waited too long for a lock another session holds (rerun)",
    EXIT_SERVICE_LOST: "a service was lost mid-run beyond the retry budget (drain mode); nothing uncommitted was "
    "deleted; rerun to resume",
    EXIT_STOPPED_UNCOMMITTED: "stopped by SIGINT/SIGTERM while a service was down: `--stop-timeout` passed with "
    "messages uncommitted (one log line says how many; they were not deleted, SQS redelivers them)",
    EXIT_QUEUE_LOST: "the queue became unusable mid-run (deleted, access denied, credentials revoked); not retried",
    EXIT_BUSY: "`snapshot`: another refresh of the snapshot is running; nothing was done (it refreshes it)",
}
EXIT_SIGNAL_MEANING = (
    "a second signal N cut the run short, or Ctrl-C (130) came before the run started (nothing consumed); "
    f"{EXIT_PIPE_CLOSED} (SIGPIPE): the program reading the output (`head`, say) closed it early; "
    "the rest was not printed"
)

# The one mapping from errors to exit codes and to the one `error:` line that says what happened;
# the first match wins (subclasses before their roots). main() catches once and maps once.
ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (ConfigError, EXIT_CONFIG, "{exc}"),
    (KmsUnavailable, EXIT_UNREACHABLE, "{exc}"),
    (MaskingError, EXIT_CONFIG, "{exc}"),  # a KMS refusal, a bad key file, an inconsistent keyring
    (AuditTableUnsafe, EXIT_CONFIG, "{exc}"),  # names database/roles.sql
    (AuditUnavailable, EXIT_UNREACHABLE, "refusing to unmask without an audit record at {dsn}: {exc}"),
    (RekeyInterrupted, EXIT_SERVICE_LOST, "{exc}; committed batches are kept, rerun to resume"),
    (BackfillInterrupted, EXIT_SERVICE_LOST, "{exc}; committed batches are kept, rerun to resume"),
    (ReplayNotAudited, EXIT_UNREACHABLE, "refusing to replay without an audit record at {dsn}: {exc}"),
    (ReplayInterrupted, EXIT_SERVICE_LOST, "{exc}; committed batches are kept, rerun to resume"),
    (SnapshotBusy, EXIT_BUSY, "{exc}"),
    (SnapshotLockTimeout, EXIT_UNREACHABLE, "{exc}"),  # not "unreachable": a lock was held too long
    (DatabaseUnavailable, EXIT_UNREACHABLE, "PostgreSQL unreachable at {dsn}: {exc}"),
    (DatabaseError, EXIT_CONFIG, "{exc}"),
    (BudgetExhausted, EXIT_UNREACHABLE, "PostgreSQL at {dsn}: {exc}"),  # the schema set-up at start
    (SqsError, EXIT_UNREACHABLE, "SQS queue {queue} unusable: {exc}"),
    (ServiceLost, EXIT_SERVICE_LOST, "{exc}; nothing uncommitted was deleted, rerun to resume"),
    (
        Stopped,
        EXIT_STOPPED_UNCOMMITTED,
        "stop timeout ({stop_timeout} s) passed: {exc}; they were not deleted and SQS redelivers them",
    ),
    (QueueLost, EXIT_QUEUE_LOST, "the queue became unusable mid-run: {exc}; nothing uncommitted was deleted"),
)

logger = logging.getLogger("login_etl")

# What signal.signal() takes and returns (typeshed's alias for it is private).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code. Expected errors end as one line and a code (ERRORS)."""
    context: dict[str, str] = {"dsn": "PostgreSQL", "queue": "", "stop_timeout": ""}
    _no_core_dumps()
    try:
        return _main(argv, context)
    except KeyboardInterrupt:
        # Ctrl-C before the pipeline's own handlers are in place (loading keys, connecting):
        # nothing has been received yet, so there is nothing to finish.
        return _fail("interrupted", EXIT_SIGNAL_BASE + signal.SIGINT)
    except tuple(kind for kind, _, _ in ERRORS) as exc:
        code, template = next((code, template) for kind, code, template in ERRORS if isinstance(exc, kind))
        return _fail(template.format(exc=exc, **context), code)


def _no_core_dumps() -> None:
    """RLIMIT_CORE 0, soft and hard: a core file would hold the masking key, the database password
    and the masker's cache of recent raw values. Nothing here can raise it again."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # pragma: no cover - a platform without the limit
        logger.debug("could not turn core dumps off")


def _main(argv: Sequence[str] | None, context: dict[str, str]) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.backoff_base_seconds > args.backoff_cap_seconds:
        parser.error("--backoff-base-seconds must not exceed --backoff-cap-seconds")
    configure_logging(args.verbose - args.quiet, args.log_format)
    load_env_file(env_file())
    if args.command == "keygen":
        if args.kms_key_id is not None and args.key_format == "tink":
            parser.error("--kms-key-id makes a KMS-wrapped data key; it cannot be combined with --format tink")
        if (args.export or args.rotate) and args.key_format != "tink":
            parser.error("--export and --rotate print a Tink keyset: add --format tink")
        if args.replace and args.output is None:
            parser.error("--replace goes with --output FILE")
        if args.key_format == "tink":
            text = _keygen_tink(export=args.export, rotate=args.rotate)
        else:
            text = _keygen(args.kms_key_id)
        return _emit_key(text, args.output, replace=args.replace)
    if args.command == "retention":
        return _retention(args, context)
    if args.command == "check":
        return _check()
    if args.command == "snapshot":
        return _snapshot(context)
    settings = Settings.from_env(os.environ)
    context.update(
        dsn=redact_dsn(settings.database_url), queue=settings.queue_url, stop_timeout=f"{args.stop_timeout:g}"
    )
    masker = settings.load_masker()
    logger.debug("masking keys loaded: %r", masker)
    if args.command == "unmask":
        return _unmask(settings, masker, args)
    if args.command == "rekey":
        return _rekey(settings, masker, args)
    if args.command == "replay":
        return _replay(settings, masker, args)
    if args.command == "backfill-networks":
        return _backfill_networks(settings, masker, args, _backoff(args))
    return _run(settings, masker, args)


def env_file() -> Path:
    """The .env file main() reads: the one in the working directory (tests point it elsewhere)."""
    return Path.cwd() / ".env"


def load_env_file(path: Path) -> None:
    """Load `path` into os.environ; the real environment wins, variable by variable.

    A key source set in the environment (or on the command line: `MASKING_KEY_FILE=k.json python
    main.py ...`) wins as a whole: the .env's key sources and its MASKING_KEY_VERSION, which belong
    to the .env's keyring, are then ignored, and one line on stderr says so.
    """
    if not path.is_file():
        return
    chosen = [name for name in KEY_SOURCES if os.environ.get(name, "").strip()]
    ignored = []
    for name, value in dotenv_values(path).items():
        if value is None or name in os.environ:
            continue
        if chosen and (name in KEY_SOURCES or name == "MASKING_KEY_VERSION"):
            if value.strip():
                ignored.append(name)
            continue
        os.environ[name] = value
    if ignored:
        print(
            f"note: the key source in the environment ({', '.join(chosen)}) wins: {path.name}'s "
            f"{', '.join(ignored)} ignored",
            file=sys.stderr,
        )


def _keygen(kms_key_id: str | None) -> str:
    if kms_key_id is None:
        return generate_key()
    kms = KmsSettings.from_env(os.environ)
    return generate_wrapped_key(kms_key_id, region=kms.region, endpoint_url=kms.endpoint_url)


def _keygen_tink(*, export: bool, rotate: bool) -> str:
    """A new keyset of one key; or the configured keyring as a keyset (--export), plus a new primary (--rotate)."""
    if not (export or rotate):
        key_id = new_key_id()
        return keyset_json({key_id: secrets.token_bytes(KEY_BYTES)}, key_id)
    settings = Settings.from_env(os.environ)  # its errors, and the keys', end in ERRORS
    keys, primary = settings.key_source.load(), settings.key_version
    if rotate:
        primary = new_key_id(set(keys))
        keys[primary] = secrets.token_bytes(KEY_BYTES)
    return keyset_json(keys, primary)


def _emit_key(text: str, output: str | None, *, replace: bool) -> int:
    """Print the key (no --output), or write it whole to a file (pii.key_files) and say so on stderr."""
    if output is None:
        print(text)
        return EXIT_OK
    kept = write_key_file(output, text, replace=replace)  # KeyFileError ends in ERRORS (exit 2)
    print(
        f"wrote {output} (mode 0600)" + (f"; the file it replaced is kept as {kept}" if kept else ""), file=sys.stderr
    )
    return EXIT_OK


def _backoff(args: argparse.Namespace) -> Backoff:
    """The one retry policy of the process (--backoff-base-seconds, --backoff-cap-seconds): the loop
    builds the same from PipelineOptions; the database classes get it passed in."""
    return Backoff(args.backoff_base_seconds, args.backoff_cap_seconds)


def _connect(writer: PostgresWriter, args: argparse.Namespace) -> None:
    """Connect and set up the schema; a schema lock held by someone else is waited out with backoff
    (for the retry budget in drain mode, for ever with --follow); PostgreSQL unreachable is not."""
    retrier = Retrier(_backoff(args), StopState(), budget_seconds=None if args.follow else args.retry_budget_seconds)
    retrier.call("PostgreSQL", "schema set-up", writer.connect, SchemaBusy)


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


def _run(settings: Settings, masker: Masker, args: argparse.Namespace) -> int:
    address = args.metrics_address or os.environ.get("METRICS_ADDRESS") or DEFAULT_METRICS_ADDRESS
    metrics = _serve_metrics(args.metrics_port, address)
    writer = PostgresWriter(settings.database_url, backoff=_backoff(args), key_checks=masker.check_values)
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


# glibc's mallopt parameter: allocations from this size up are mmap'd, so freed ones go back at once.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024


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
    _connect(writer, args)
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
    attributes = reader.check()
    options = PipelineOptions(
        follow=args.follow,
        receivers=args.receivers,
        deleters=args.deleters,
        batch_size=args.batch_size,
        flush_seconds=args.flush_seconds,
        retry_budget_seconds=args.retry_budget_seconds,
        stop_timeout_seconds=args.stop_timeout,
        backoff_base_seconds=args.backoff_base_seconds,
        backoff_cap_seconds=args.backoff_cap_seconds,
        visibility_timeout_seconds=int(attributes.get("VisibilityTimeout", 30)),
        max_receives=_max_receives(args.max_receives, attributes),
        max_body_bytes=args.max_body_bytes or settings.max_body_bytes,
        max_bytes_in_hand=args.max_bytes_in_hand or settings.max_bytes_in_hand,
        max_message_bytes=_max_message_bytes(attributes),
    )
    pipeline = Pipeline(reader, writer, masker, options, observer=metrics)

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


def _check() -> int:
    """Print the checklist (health.py); exit 2 if the configuration failed, else 3 if a service did."""
    failures = set()
    for item in checklist_from_env(os.environ):
        print(item)
        if not item.passed:
            failures.add(item.failure)
    return EXIT_CONFIG if Failure.CONFIGURATION in failures else EXIT_UNREACHABLE if failures else EXIT_OK


def _max_message_bytes(attributes: dict[str, str]) -> int:
    """The queue's MaximumMessageSize (SQS's largest when absent): one receive is counted at 10 times it."""
    raw = attributes.get("MaximumMessageSize", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) <= SQS_MAX_MESSAGE_BYTES else SQS_MAX_MESSAGE_BYTES


def _max_receives(wanted: int, attributes: dict[str, str]) -> int:
    """Quarantine looping messages before SQS would move them to the dead-letter queue."""
    try:
        dlq_after = int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"])
    except (KeyError, ValueError, TypeError):
        return wanted
    return max(1, min(wanted, dlq_after - 1))


def _unmask(settings: Settings, masker: Masker, args: argparse.Namespace) -> int:
    # Decrypt in memory, commit the audit row, and only then show anything: no unaudited unmask.
    for position, token in enumerate(args.tokens, start=1):
        canonical = canonical_spelling(token)
        if canonical is not None and canonical != token:
            # Another spelling of a stored token: its audit fingerprint would match no stored row.
            return _fail(
                f"token {position} is not in its canonical spelling (as stored in user_logins): copy the "
                "token exactly as stored; nothing was unmasked",
                EXIT_CONFIG,
            )
    values: list[str] = []
    errors: list[str] = []
    foreign: set[int] | None = None  # versions the database records with another key; looked up once
    for position, token in enumerate(args.tokens, start=1):
        try:
            values.append(masker.unmask(token))
        except MaskingError as exc:
            reason = str(exc)
            version = token_version_or_none(token)
            if version in masker.versions:
                if foreign is None:
                    foreign = set(key_mismatches(settings.database_url, masker.check_values))
                if version in foreign:
                    reason = (
                        f"made by a different key with version {version}: the database records another key "
                        f"under version {version} than the one this keyring holds; unmask it with that key"
                    )
            errors.append(f"error: token {position}: {reason}")
    AuditLog(settings.database_url).record(  # AuditUnavailable: nothing is shown (ERRORS)
        UnmaskAudit.of(args.requested_by or _os_user(), args.reason, args.tokens, failed=len(errors))
    )
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return EXIT_UNMASK_FAILED  # print nothing rather than a list that no longer lines up
    for value in values:
        print(value if args.raw else escape_controls(value))
    return EXIT_OK


def key_mismatches(dsn: str, held: dict[int, str]) -> list[int]:
    """The versions held that the database records with another key (database/key_checks.py); [] if it
    cannot tell (unreachable, before schema 6, or this role may not read the table)."""
    writer = PostgresWriter(dsn)
    try:
        writer.connect(migrate=False)
        return key_checks.mismatched(held, writer.recorded_key_checks())
    except DatabaseError:
        return []
    finally:
        writer.close()


def token_version_or_none(token: str) -> int | None:
    try:
        return token_version(token)
    except MaskingError:
        return None


def _rekey(settings: Settings, masker: Masker, args: argparse.Namespace) -> int:
    """Rewrite the tokens of other key versions under the active one; exit 0, or 1 if some are left."""
    # Tokens are rewritten under the active key only if the database knows no other key under one of
    # the keyring's versions (KeyMismatch: exit 2, nothing rewritten). Rekey does not migrate (its role
    # need not own the schema); it records the versions the database does not know yet.
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    try:
        writer.connect(migrate=False, register_keys=True)
    finally:
        writer.close()
    batch_rows, backoff = args.rekey_batch_size, _backoff(args)
    rekeyer = Rekeyer(
        settings.database_url,
        masker.rekey,
        current_prefixes=masker.current_prefixes,
        batch_rows=batch_rows,
        backoff=backoff,
    )
    try:
        result = rekeyer.run()
    except KeyboardInterrupt:
        print("rekey interrupted: committed batches are kept, rerun to resume", file=sys.stderr)
        return EXIT_SIGNAL_BASE + signal.SIGINT
    print(result.summary(masker.version))
    for reason, count in result.failures.most_common():
        print(f"error: {count} token(s) not rewritten: {reason}", file=sys.stderr)
    return EXIT_OK if result.remaining == 0 else EXIT_UNMASK_FAILED


def _backfill_networks(settings: Settings, masker: Masker, args: argparse.Namespace, backoff: Backoff) -> int:
    # It writes tokens: like rekey, only if the database knows no other key under a version held.
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    try:
        _connect(writer, args)  # the column comes with schema 7: migrate first, as the ETL does at start
    finally:
        writer.close()
    backfill = NetworkBackfill(
        settings.database_url, masker.network_of_token, batch_rows=args.backfill_batch_size, backoff=backoff
    )
    try:
        result = backfill.run()
    except KeyboardInterrupt:
        print("backfill-networks interrupted: committed batches are kept, rerun to resume", file=sys.stderr)
        return EXIT_SIGNAL_BASE + signal.SIGINT
    print(result.summary())
    for reason, count in result.failures.most_common():
        print(f"error: {count} ip token(s) not read: {reason}", file=sys.stderr)
    return EXIT_OK if result.remaining == 0 else EXIT_UNMASK_FAILED


def _replay(settings: Settings, masker: Masker, args: argparse.Namespace) -> int:
    # Decrypt and validate in memory, commit the audit row, and only then move anything.
    replayer = Replayer(
        settings.database_url, lambda message_id, body, sent_at: retry_quarantined(message_id, body, sent_at, masker)
    )
    request = ReplayRequest(args.requested_by or _os_user(), args.reason, args.where_reason, args.since, args.dry_run)
    # The schema must be current (replayed_at), and the keyring the database's (key_checks).
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    try:
        if not args.dry_run:
            _connect(writer, args)  # brings the schema up to date, as the ETL does at start
        else:
            # A dry run changes nothing, the schema included: it looks, and stops if it is behind.
            writer.connect(migrate=False)
            version = writer.schema_version()
            if version is None or version < SCHEMA_VERSION:
                found = (
                    "not created" if version is None else f"at version {version}, this release's is {SCHEMA_VERSION}"
                )
                return _fail(
                    f"replay --dry-run: the schema at {redact_dsn(settings.database_url)} is {found}; a dry run "
                    "does not migrate it. Nothing was changed. Run `python main.py replay` without --dry-run "
                    "(it migrates first) or start the ETL once, then dry-run again",
                    EXIT_CONFIG,
                )
    finally:
        writer.close()
    result = replayer.run(request)  # its errors end in ERRORS
    print("\n".join(result.lines(args.dry_run)))
    return EXIT_OK


def _retention(args: argparse.Namespace, context: dict[str, str]) -> int:
    """Drop what is older than --keep-days (no key needed); exit 0, 2 (configuration) or 3 (PostgreSQL)."""
    dsn = database_url_from_env(os.environ)
    context["dsn"] = redact_dsn(dsn)
    retention = Retention(
        dsn,
        keep_days=args.keep_days,
        requested_by=args.requested_by or _os_user(),
        allow_redelivered_days=args.allow_redelivered_days,
    )  # refuses a --keep-days SQS could still redeliver into (RetentionTooShort: exit 2)
    print(retention.run(dry_run=args.dry_run).summary())  # its errors end in ERRORS
    return EXIT_OK


def _snapshot(context: dict[str, str]) -> int:
    """The nightly job (no key needed): a pass of the closed days' token indexes, then the refresh of
    the analysts' all-time snapshot; exit 0, 2 (not migrated, not the view's owner), 3 (PostgreSQL
    unreachable, a lock held too long) or 7 (another refresh runs)."""
    dsn = database_url_from_env(os.environ)
    context["dsn"] = redact_dsn(dsn)
    print(nightly_pass(dsn), flush=True)  # first: the refresh then reads the closed days from them
    print(SnapshotRefresher(dsn).run().summary())  # its errors end in ERRORS
    return EXIT_OK


def _fail(message: str, exit_code: int) -> int:
    """Print one `error:` line on stderr and return the exit code to end with."""
    print(f"error: {escape_controls(message)}", file=sys.stderr)  # one line, whatever a user typed into it
    return exit_code


def _install_signal_handlers(pipeline: Pipeline) -> dict[int, SignalHandler]:
    """Route SIGINT/SIGTERM to a graceful stop; return the handlers they replace."""

    def handle(signum: int, _frame: object) -> None:
        if pipeline.stopping:
            # Second signal: leave at once. Uncommitted messages return to the queue later.
            os._exit(EXIT_SIGNAL_BASE + signum)
        logger.info("%s received: finishing the batch in hand", signal.Signals(signum).name)
        pipeline.stop()

    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}"


def _audit_text(limit: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be blank")
        if len(text) > limit:
            raise argparse.ArgumentTypeError(f"at most {limit} characters")
        return text.strip()

    return parse


def _since(text: str) -> datetime:
    """A point in time: an ISO 8601 date or date-time (UTC unless it says), or an age: 90m, 12h, 7d."""
    age = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[age.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(age.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected an ISO date or date-time (2026-11-26, 2026-11-26T09:00:00Z) or an age (90m, 12h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _byte_count(minimum: int) -> Callable[[str], int]:
    """A byte count (`65536`, `64KiB`, `48MiB`) of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = parse_bytes(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} bytes")
        return value

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    """A finite number of seconds, > 0 (or >= 0 where zero means "at once")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError("must be >= 0" if allow_zero else "must be > 0")
        return value

    return parse


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 1..65535")
    return int(text)


def _exit_code_list() -> str:
    """--help's epilog: the exit-code table (EXIT_CODES), one code a paragraph."""
    rows = [
        *((str(code), meaning) for code, meaning in EXIT_CODES.items()),
        (f"{EXIT_SIGNAL_BASE}+N", EXIT_SIGNAL_MEANING),
    ]
    lines = ["exit codes (docs/operations.md):"]
    for code, meaning in rows:
        lines.append(textwrap.fill(meaning, width=100, initial_indent=f"  {code:<6} ", subsequent_indent=" " * 9))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {escape_controls(message)} (see --help)\n")


def _add_audit_arguments(parser: argparse.ArgumentParser, why: str) -> None:
    """--reason (required) and --requested-by: who and why, for an audited command."""
    parser.add_argument(
        "--reason", required=True, type=_audit_text(1000), help=f"{why} (required; recorded in the audit)"
    )
    parser.add_argument(
        "--requested-by", type=_audit_text(128), default=None, metavar="NAME", help="who asks (default: the OS user)"
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="main.py",
        description="Consume login events from SQS, mask ip/device_id, store them in PostgreSQL.",
        epilog=_exit_code_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--follow", action="store_true", help="keep long-polling until SIGINT/SIGTERM")
    parser.add_argument(
        "--receivers",
        type=_positive_int,
        default=DEFAULT_RECEIVERS,
        help=f"concurrent receive threads ({DEFAULT_RECEIVERS})",
    )
    parser.add_argument(
        "--deleters",
        type=_positive_int,
        default=DEFAULT_DELETERS,
        help=f"concurrent DeleteMessageBatch calls after each commit ({DEFAULT_DELETERS})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per transaction at most ({DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--flush-seconds",
        type=_seconds(allow_zero=True),
        default=DEFAULT_FLUSH_SECONDS,
        help=f"commit a partial batch once its oldest message is this old ({DEFAULT_FLUSH_SECONDS})",
    )
    parser.add_argument(
        "--wait-seconds",
        type=int,
        choices=range(0, 21),
        metavar="0..20",
        default=None,
        help="long-poll wait; drain stops at the first empty poll (1 drain, 5 follow)",
    )
    parser.add_argument(
        "--retry-budget-seconds",
        type=_seconds(allow_zero=True),
        default=60.0,
        help="drain mode: give up after a service is lost this long (60); --follow waits forever",
    )
    parser.add_argument(
        "--stop-timeout",
        type=_seconds(allow_zero=True),
        default=DEFAULT_STOP_TIMEOUT_SECONDS,
        metavar="S",
        help="on SIGINT/SIGTERM, keep retrying the batch in hand this long, then exit "
        f"5 leaving it uncommitted ({DEFAULT_STOP_TIMEOUT_SECONDS:.0f}; below a 30 s grace period)",
    )
    parser.add_argument(
        "--backoff-base-seconds",
        type=_seconds(allow_zero=False),
        default=DEFAULT_BASE_SECONDS,
        metavar="S",
        help=f"first retry waits up to this long, doubling per failure ({DEFAULT_BASE_SECONDS})",
    )
    parser.add_argument(
        "--backoff-cap-seconds",
        type=_seconds(allow_zero=False),
        default=DEFAULT_CAP_SECONDS,
        metavar="S",
        help=f"longest wait between retries ({DEFAULT_CAP_SECONDS:.0f})",
    )
    parser.add_argument(
        "--max-receives",
        type=_positive_int,
        default=5,
        help="quarantine a message whose processing keeps failing after this many receives "
        "(5; capped below the queue's RedrivePolicy maxReceiveCount)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_byte_count(MIN_MAX_BODY_BYTES),
        default=None,
        metavar="BYTES",
        help="quarantine larger bodies unparsed, keeping a 4 KiB encrypted prefix, the length and the "
        f"SHA-256 (MAX_BODY_BYTES, else {DEFAULT_MAX_BODY_BYTES}; units KiB, MiB)",
    )
    parser.add_argument(
        "--max-bytes-in-hand",
        type=_byte_count(MIN_MAX_BYTES_IN_HAND),
        default=None,
        metavar="BYTES",
        help="bound on the bodies received and not yet committed; receivers wait at it "
        f"(MAX_BYTES_IN_HAND, else {DEFAULT_MAX_BYTES_IN_HAND // 1_048_576}MiB; at least 10MiB)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port, with the probes /livez and /readyz (off by default)",
    )
    parser.add_argument(
        "--metrics-address",
        default=None,
        metavar="ADDR",
        help=f"the address to serve metrics and probes on (METRICS_ADDRESS, else {DEFAULT_METRICS_ADDRESS}: "
        "every interface); e.g. 127.0.0.1 on a host",
    )
    parser.add_argument(
        "--progress-seconds",
        type=_seconds(allow_zero=False),
        default=None,
        metavar="S",
        help="progress interval (0.5 s redrawn on a terminal, else a log line every 10 s)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="text (default) or json: one object per line"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    sub = parser.add_subparsers(
        dest="command", metavar="{check,unmask,keygen,rekey,backfill-networks,replay,retention,snapshot}"
    )
    sub.add_parser(
        "check",
        help="check configuration, SQS, the DLQ and PostgreSQL; print a checklist",
        description="Verify the configuration and key, that the queue (and its dead-letter "
        "queue) exists, and that PostgreSQL answers with a current schema (or none yet: the ETL "
        "creates it at its first run). Changes nothing. Exit 0 if all pass, 2 if the configuration "
        "or the keys fail, else 3 if a service check fails.",
    )
    unmask = sub.add_parser(
        "unmask",
        help="print the original value of each token, one per line (audited)",
        description="Print the original value of each token, one per line, in order. "
        "Tokens of ip and device_id (and rejected bodies), of any key version held, are "
        "accepted; a network token (masked_network) prints its network, e.g. 203.0.113.0/24. "
        "Needs the key and DATABASE_URL: every call is first recorded in "
        "pii_unmask_audit (who, why, token fingerprints; never a value); if that fails, "
        "nothing is shown and the exit code is 3.",
    )
    _add_audit_arguments(unmask, "why these values are needed")
    unmask.add_argument(
        "--raw",
        action="store_true",
        help="print values byte-exact; by default control and format characters are shown "
        "as \\xNN/\\uNNNN escapes and a backslash as \\\\, so a value cannot drive the terminal",
    )
    unmask.add_argument("tokens", nargs="+", metavar="TOKEN")
    keygen = sub.add_parser(
        "keygen",
        help="print a new random MASKING_KEY, or a KMS-wrapped data key",
        description="Print a new random key (base64 of 64 bytes) for MASKING_KEY or "
        "MASKING_KEYS; with --kms-key-id, a new 64-byte data key wrapped by that KMS key "
        "(base64 of the CiphertextBlob, for MASKING_KEY_KMS_CIPHERTEXT): no plaintext key "
        "is printed or written.",
    )
    keygen.add_argument(
        "--kms-key-id",
        metavar="ID",
        default=None,
        help="KMS key id, ARN or alias (alias/NAME); AWS_ENDPOINT_URL_KMS applies",
    )
    keygen.add_argument(
        "--format",
        dest="key_format",
        choices=("base64", "tink"),
        default="base64",
        help="base64 (default): one key for MASKING_KEY; tink: a Tink JSON keyset of one new "
        "AES-SIV key, for MASKING_KEYSET or MASKING_KEY_FILE (docs/tink-tokens.md)",
    )
    keygen.add_argument(
        "--output",
        metavar="FILE",
        default=None,
        help="write the key to FILE (mode 0600) instead of printing it: made whole in a temporary "
        "file beside it, fsynced, then renamed, so FILE is never empty or partial; an existing FILE "
        "is refused unless --replace",
    )
    keygen.add_argument(
        "--replace",
        action="store_true",
        help="with --output: replace an existing FILE, keeping it first as FILE.previous "
        "(or FILE.previous.<UTC time> when that is taken)",
    )
    what = keygen.add_mutually_exclusive_group()
    what.add_argument(
        "--export",
        action="store_true",
        help="with --format tink: the configured keyring as a keyset, its active version "
        "primary (for BigQuery or Tink; it holds the keys)",
    )
    what.add_argument(
        "--rotate", action="store_true", help="with --format tink: the configured keyring plus a new key, made primary"
    )
    rekey = sub.add_parser(
        "rekey",
        help="rewrite stored tokens of older key versions under the active one",
        description="Rewrite the tokens in user_logins (masked_ip, masked_device_id, masked_network) and "
        "user_logins_rejected (encrypted_body) that are not of the active key "
        "(MASKING_KEY_VERSION, or the keyset's primary), legacy v<n>. tokens included, in "
        "batches of one transaction each. Safe to run while the ETL runs and to kill: "
        "a rerun resumes. Exit 0 when no token of another version is left, 1 otherwise.",
    )
    rekey.add_argument(
        "--batch-size",
        dest="rekey_batch_size",
        type=_positive_int,
        default=500,
        metavar="N",
        help="about this many rows per transaction (500)",
    )
    backfill = sub.add_parser(
        "backfill-networks",
        help="give the rows stored before schema 7 their network token (masked_network)",
        description="Fill masked_network, the network token (/24, /48) of the IP, in the rows of "
        "user_logins stored before schema 7, from their ip token (needs the key; no value is "
        "printed or stored in clear), in batches of one transaction each. Safe to run while the ETL "
        "runs and to stop: a rerun resumes. Legacy v<n>. ip tokens need `rekey` first. `check` "
        "says how many rows still lack one. Exit 0 when none is left, 1 otherwise.",
    )
    backfill.add_argument(
        "--batch-size",
        dest="backfill_batch_size",
        type=_positive_int,
        default=500,
        metavar="N",
        help="about this many rows per transaction (500)",
    )
    replay = sub.add_parser(
        "replay",
        help="load quarantined messages that today's validation accepts (audited)",
        description="Decrypt quarantined bodies in memory, validate them as the ETL does "
        "today, and load those that pass into user_logins (idempotent on message_id; safe "
        "to run twice and beside the ETL); the others stay quarantined with today's reason. "
        "Every call is first recorded in etl_replay_audit (who, why, counts, message ids; "
        "never a value); if that fails nothing moves and the exit code is 3. Loaded rows "
        "keep their quarantine row with replayed_at set (view user_logins_replayed).",
    )
    _add_audit_arguments(replay, "why")
    replay.add_argument(
        "--where-reason",
        default=None,
        metavar="PATTERN",
        help="only rows whose reason matches this ILIKE pattern, e.g. 'processing failed%%'",
    )
    replay.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="WHEN",
        help="only rows quarantined at or after WHEN: 2026-11-26, 2026-11-26T09:00:00Z, or 12h, 7d",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print counts by outcome and reason, change nothing (still audited)"
    )
    retention = sub.add_parser(
        "retention",
        help="drop the daily partitions of user_logins older than N days (audited)",
        description="Drop the daily partitions of user_logins dated before today minus "
        "--keep-days (today and yesterday are never touched), and delete older rows of "
        "user_logins_default and (by received_at) user_logins_rejected. Each drop or delete "
        "commits with its row in etl_retention_audit. Needs DATABASE_URL only (no key). "
        "Undated rows (no SentTimestamp) are kept and counted. "
        "Exit 0 done, 2 configuration (a --keep-days below the SQS window without its override, "
        "or a table not yet migrated), 3 PostgreSQL unreachable or a lock held too long (rerun).",
    )
    retention.add_argument(
        "--keep-days", type=_positive_int, required=True, metavar="N", help="keep today and the N full days before it"
    )
    retention.add_argument("--dry-run", action="store_true", help="print what would be dropped; change nothing")
    retention.add_argument(
        "--allow-redelivered-days",
        action="store_true",
        help=f"allow --keep-days below {MIN_KEEP_DAYS}, which may drop a day SQS can still redeliver "
        "(such a message would be stored again); only if no queue keeps messages that long",
    )
    retention.add_argument(
        "--requested-by",
        type=_audit_text(128),
        default=None,
        metavar="NAME",
        help="who runs it, for the audit (default: the OS user)",
    )
    sub.add_parser(
        "snapshot",
        help="nightly: build the closed days' token indexes, then refresh the analysts' all-time snapshot",
        description="First, one pass of the token indexes: the closed days' partitions (before today, "
        "UTC, and the default one) that lack the analysts' two token indexes get them, built "
        "CONCURRENTLY (writes go on), skipped if the ETL's indexer is building them or the schema "
        "is not current (a line says what was built). Then refresh user_login_duplicates_snapshot, "
        "the stored copy of the view "
        "user_login_duplicates that the analysts' all-time top-20 queries read: the first time "
        "plainly (it is created empty), afterwards CONCURRENTLY, so the previous snapshot stays "
        "readable until the new one commits. Reads the closed days' token indexes and scans today's "
        "partition (minutes at 100M rows): no statement timeout. Run it as the ETL role (it owns the "
        "view and the partitions). Needs DATABASE_URL only (no "
        "key). Prints the rows, the seconds and refreshed_at. Exit 0 done, 2 schema not yet "
        "migrated to version 5 (start the ETL once) or refused (not the owner), 3 PostgreSQL "
        "unreachable or a lock held too long (rerun), 7 another refresh is running.",
    )
    return parser


def _run_main() -> int:
    """main(), but a reader that closed our stdout early (`| head`) ends it quietly: no traceback."""
    try:
        code = main()
        sys.stdout.flush()  # what is still buffered fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that this fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(_run_main())
