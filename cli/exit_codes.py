"""The one table of exit codes, and the one mapping of errors to them.

--help and every subcommand's help print their codes from EXIT_CODES (`exit_code_list`), and
docs/operations.md's table says exactly the same (tests/unit/test_docs.py). main() catches once and
maps once (`exit_for`); each error class appears in ERRORS once, under the code whose meaning names it.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from dataclasses import asdict, dataclass

from aws.sqs import SqsError
from config import ConfigError
from database.audit import AuditUnavailable
from database.audit_tables import AuditTableUnsafe
from database.errors import DatabaseError, DatabaseUnavailable, KeyMismatch, SchemaBusy
from database.network_backfill import BackfillInterrupted
from database.rekey import RekeyInterrupted
from database.replay import ReplayInterrupted, ReplayNotAudited, ReplaySchemaBehind
from database.retention import RetentionBusy, RetentionTooShort
from database.snapshot import SnapshotBusy, SnapshotLockTimeout
from etl.observability import escape_controls
from etl.pipeline import QueueLost, ServiceLost, Stopped
from pii.keys import KmsUnavailable
from pii.masking import MaskingError

EXIT_OK = 0
EXIT_UNMASK_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_SERVICE_LOST = 4
EXIT_STOPPED_UNCOMMITTED = 5
EXIT_QUEUE_LOST = 6
EXIT_BUSY = 7
EXIT_SIGNAL_BASE = 128  # + the signal's number
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT  # 130: Ctrl-C
EXIT_PIPE_CLOSED = EXIT_SIGNAL_BASE + signal.SIGPIPE  # 141, as a shell reports a process SIGPIPE ended

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_UNMASK_FAILED: "`unmask` failed (a token that does not decrypt under the keys held, or made by a different "
    "key with its version), or `rekey` left tokens it cannot rewrite, or `backfill-networks` left rows without a "
    "network token (an ip token of a key not held)",
    EXIT_CONFIG: "configuration or usage error: no or several key sources, a key that does not load (a KMS refusal, "
    "one key under two versions, a refused key file), a key version the database records with another key, a "
    "`DATABASE_URL` libpq cannot parse, a flag value out of range or a busy `--metrics-port`, `unmask` without "
    "`--reason`, `keygen --output` onto an existing file without `--replace`, a command refused by PostgreSQL "
    "(schema not migrated yet, not the owner); nothing is consumed",
    EXIT_UNREACHABLE: "SQS, PostgreSQL or KMS unreachable at start (nothing is consumed), or `unmask` could not "
    "write its audit row, or `retention`, `snapshot` or the schema set-up at start waited too long for a lock "
    "another session holds (rerun)",
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

_RESUME = "; committed batches are kept, rerun to resume"

# Error -> (exit code, the one `error:` line); the first match wins, so leaves come before their
# roots. The placeholders are ErrorContext's fields.
ERRORS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int, str], ...] = (
    (ConfigError, EXIT_CONFIG, "{exc}"),
    (KmsUnavailable, EXIT_UNREACHABLE, "{exc}"),
    (MaskingError, EXIT_CONFIG, "{exc}"),  # a KMS refusal, a bad key file, an inconsistent keyring
    (AuditTableUnsafe, EXIT_CONFIG, "{exc}"),  # names database/roles.sql
    (AuditUnavailable, EXIT_UNREACHABLE, "refusing to unmask without an audit record at {dsn}: {exc}"),
    (ReplayNotAudited, EXIT_UNREACHABLE, "refusing to replay without an audit record at {dsn}: {exc}"),
    ((RekeyInterrupted, BackfillInterrupted, ReplayInterrupted), EXIT_SERVICE_LOST, "{exc}" + _RESUME),
    (SnapshotBusy, EXIT_BUSY, "{exc}"),
    # PostgreSQL answers but a lock was held too long; each message says what waited and to rerun.
    ((SnapshotLockTimeout, RetentionBusy, SchemaBusy), EXIT_UNREACHABLE, "{exc}"),
    (DatabaseUnavailable, EXIT_UNREACHABLE, "PostgreSQL unreachable at {dsn}: {exc}"),
    (
        ReplaySchemaBehind,
        EXIT_CONFIG,
        "replay --dry-run: the schema at {dsn} is {exc}; a dry run does not migrate it. Nothing was changed. "
        "Run `python main.py replay` without --dry-run (it migrates first) or start the ETL once, then dry-run again",
    ),
    ((KeyMismatch, RetentionTooShort), EXIT_CONFIG, "{exc}"),
    # The root raised as such: PostgreSQL refused a command (not migrated, not the owner, a permission).
    (DatabaseError, EXIT_CONFIG, "{exc}"),
    (SqsError, EXIT_UNREACHABLE, "SQS queue {queue} unusable: {exc}"),
    (ServiceLost, EXIT_SERVICE_LOST, "{exc}; nothing uncommitted was deleted, rerun to resume"),
    (
        Stopped,
        EXIT_STOPPED_UNCOMMITTED,
        "stop timeout ({stop_timeout} s) passed: {exc}; they were not deleted and SQS redelivers them",
    ),
    (QueueLost, EXIT_QUEUE_LOST, "the queue became unusable mid-run: {exc}; nothing uncommitted was deleted"),
)
HANDLED: tuple[type[Exception], ...] = tuple(
    kind for kinds, _, _ in ERRORS for kind in (kinds if isinstance(kinds, tuple) else (kinds,))
)


@dataclass(slots=True)
class ErrorContext:
    """What the `error:` lines may name, filled in as a command learns it (never a password)."""

    dsn: str = "PostgreSQL"
    queue: str = ""
    stop_timeout: str = ""


def exit_for(exc: Exception, context: ErrorContext) -> tuple[int, str]:
    """The exit code and the `error:` line (without its prefix) for an error of ERRORS."""
    code, template = next((code, template) for kinds, code, template in ERRORS if isinstance(exc, kinds))
    return code, template.format(exc=exc, **asdict(context))


def fail(message: str, exit_code: int) -> int:
    """Print one `error:` line on stderr and return the exit code to end with."""
    print(f"error: {escape_controls(message)}", file=sys.stderr)  # one line, whatever a user typed into it
    return exit_code


def exit_code_list(*codes: int) -> str:
    """A help epilog: the given codes' meanings from EXIT_CODES (all of them, and 128+N, if none given)."""
    rows = [(str(code), EXIT_CODES[code]) for code in codes or EXIT_CODES]
    if not codes:
        rows.append((f"{EXIT_SIGNAL_BASE}+N", EXIT_SIGNAL_MEANING))
    lines = ["exit codes (docs/operations.md):"]
    for code, meaning in rows:
        lines.append(textwrap.fill(meaning, width=100, initial_indent=f"  {code:<6} ", subsequent_indent=" " * 9))
    return "\n".join(lines)
