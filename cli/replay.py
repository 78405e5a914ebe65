"""`replay`: load the quarantined messages that today's validation accepts, audited before anything moves."""

from __future__ import annotations

import argparse
from typing import Any

from cli.arguments import add_audit_arguments, add_command, os_user, since
from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_SERVICE_LOST, EXIT_UNREACHABLE, ErrorContext
from cli.startup import DEFAULT_RETRY_BUDGET_SECONDS, load_keys, set_up_schema
from database.replay import Replayer, ReplayRequest, require_current_schema
from database.sqs_postgres import PostgresWriter
from etl.transform import retry_quarantined


def register(subparsers: Any) -> None:
    """Add `replay` to the subcommands."""
    parser = add_command(
        subparsers,
        "replay",
        help="load quarantined messages that today's validation accepts (audited)",
        description="Decrypt quarantined bodies in memory, validate them as the ETL does today, and load "
        "those that pass into user_logins (idempotent on message_id; safe to run twice and beside the ETL); "
        "the others stay quarantined with today's reason. Every call is first recorded in etl_replay_audit "
        "(who, why, counts, message ids; never a value); if that fails nothing moves. Loaded rows keep their "
        "quarantine row with replayed_at set (view user_logins_replayed).",
        exit_codes=(EXIT_OK, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_SERVICE_LOST),
    )
    add_audit_arguments(parser, "why")
    parser.add_argument(
        "--where-reason",
        default=None,
        metavar="PATTERN",
        help="only rows whose reason matches this ILIKE pattern, e.g. 'processing failed%%'",
    )
    parser.add_argument(
        "--since",
        type=since,
        default=None,
        metavar="WHEN",
        help="only rows quarantined at or after WHEN: 2026-11-26, 2026-11-26T09:00:00Z, or 12h, 7d",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print counts by outcome and reason, change nothing (still audited)"
    )
    parser.set_defaults(handler=replay)


def replay(args: argparse.Namespace, context: ErrorContext) -> int:
    """Decrypt and validate in memory, commit the audit row, and only then move anything."""
    settings, masker = load_keys(context)
    replayer = Replayer(
        settings.database_url, lambda message_id, body, sent_at: retry_quarantined(message_id, body, sent_at, masker)
    )
    request = ReplayRequest(args.requested_by or os_user(), args.reason, args.where_reason, args.since, args.dry_run)
    # The schema must be current (replayed_at), and the keyring the database's (key_checks).
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    try:
        if args.dry_run:
            require_current_schema(writer)  # ReplaySchemaBehind: exit 2, nothing changed
        else:
            set_up_schema(writer, budget_seconds=DEFAULT_RETRY_BUDGET_SECONDS, dsn=settings.database_url)
    finally:
        writer.close()
    result = replayer.run(request)  # its errors end in cli.exit_codes
    print("\n".join(result.lines(args.dry_run)))
    return EXIT_OK
