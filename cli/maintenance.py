"""The scheduled upkeep that needs no key: `retention` (drop old days) and `snapshot` (the nightly
token indexes and the analysts' all-time snapshot)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from cli.arguments import add_command, audit_text, os_user, positive_int
from cli.exit_codes import EXIT_BUSY, EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE, ErrorContext
from config import database_url_from_env, redact_dsn
from database.retention import MIN_KEEP_DAYS, Retention
from database.snapshot import SnapshotRefresher
from database.token_indexes import nightly_pass


def register(subparsers: Any) -> None:
    """Add `retention` and `snapshot` to the subcommands."""
    retention = add_command(
        subparsers,
        "retention",
        help="drop the daily partitions of user_logins older than N days (audited)",
        description="Drop the daily partitions of user_logins dated before today minus --keep-days (today and "
        "yesterday are never touched), and delete older rows of user_logins_default and (by received_at) "
        "user_logins_rejected. Each drop or delete commits with its row in etl_retention_audit. Needs "
        "DATABASE_URL only (no key). Undated rows (no SentTimestamp) are kept and counted. A --keep-days "
        "below the SQS window without its override is refused.",
        exit_codes=(EXIT_OK, EXIT_CONFIG, EXIT_UNREACHABLE),
    )
    retention.add_argument(
        "--keep-days", type=positive_int, required=True, metavar="N", help="keep today and the N full days before it"
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
        type=audit_text(128),
        default=None,
        metavar="NAME",
        help="who runs it, for the audit (default: the OS user)",
    )
    retention.set_defaults(handler=retention_command)
    snapshot = add_command(
        subparsers,
        "snapshot",
        help="nightly: build the closed days' token indexes, then refresh the analysts' all-time snapshot",
        description="First, one pass of the token indexes: the closed days' partitions (before today, UTC, and "
        "the default one) that lack the analysts' two token indexes get them, built CONCURRENTLY (writes go "
        "on), skipped if the ETL's indexer is building them or the schema is not current (a line says what "
        "was built). Then refresh user_login_duplicates_snapshot, the stored copy of the view "
        "user_login_duplicates that the analysts' all-time top-20 queries read: the first time plainly (it "
        "is created empty), afterwards CONCURRENTLY, so the previous snapshot stays readable until the new "
        "one commits. Reads the closed days' token indexes and scans today's partition (minutes at 100M "
        "rows): no statement timeout. Run it as the ETL role (it owns the view and the partitions). Needs "
        "DATABASE_URL only (no key); the schema must be at version 5 or later (start the ETL once). Prints "
        "the rows, the seconds and refreshed_at.",
        exit_codes=(EXIT_OK, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_BUSY),
    )
    snapshot.set_defaults(handler=snapshot_command)


def retention_command(args: argparse.Namespace, context: ErrorContext) -> int:
    """Drop what is older than --keep-days (no key needed)."""
    dsn = database_url_from_env(os.environ)
    context.dsn = redact_dsn(dsn)
    retention = Retention(
        dsn,
        keep_days=args.keep_days,
        requested_by=args.requested_by or os_user(),
        allow_redelivered_days=args.allow_redelivered_days,
    )  # refuses a --keep-days SQS could still redeliver into (RetentionTooShort: exit 2)
    print(retention.run(dry_run=args.dry_run).summary())  # its errors end in cli.exit_codes
    return EXIT_OK


def snapshot_command(args: argparse.Namespace, context: ErrorContext) -> int:
    """The nightly job (no key needed): a pass of the closed days' token indexes, then the refresh of
    the analysts' all-time snapshot."""
    dsn = database_url_from_env(os.environ)
    context.dsn = redact_dsn(dsn)
    print(nightly_pass(dsn), flush=True)  # first: the refresh then reads the closed days from them
    print(SnapshotRefresher(dsn).run().summary())  # its errors end in cli.exit_codes
    return EXIT_OK
