"""`unmask`: the original value of each token, audited before anything is shown."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.arguments import add_audit_arguments, add_command, os_user
from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNMASK_FAILED, EXIT_UNREACHABLE, ErrorContext, fail
from cli.startup import load_keys
from database import key_checks
from database.audit import AuditLog, UnmaskAudit
from database.errors import DatabaseError
from database.sqs_postgres import PostgresWriter
from etl.observability import escape_controls
from pii.encoding import canonical_spelling
from pii.masking import Masker, MaskingError, token_version


def register(subparsers: Any) -> None:
    """Add `unmask` to the subcommands."""
    parser = add_command(
        subparsers,
        "unmask",
        help="print the original value of each token, one per line (audited)",
        description="Print the original value of each token, one per line, in order. Tokens of ip and "
        "device_id (and rejected bodies), of any key version held, are accepted; a network token "
        "(masked_network) prints its network, e.g. 203.0.113.0/24. Needs the key and DATABASE_URL: every "
        "call is first recorded in pii_unmask_audit (who, why, token fingerprints; never a value); if "
        "that fails, nothing is shown.",
        exit_codes=(EXIT_OK, EXIT_UNMASK_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE),
    )
    add_audit_arguments(parser, "why these values are needed")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="print values byte-exact; by default control and format characters are shown "
        "as \\xNN/\\uNNNN escapes and a backslash as \\\\, so a value cannot drive the terminal",
    )
    parser.add_argument("tokens", nargs="+", metavar="TOKEN")
    parser.set_defaults(handler=unmask)


def unmask(args: argparse.Namespace, context: ErrorContext) -> int:
    """Decrypt in memory, commit the audit row, and only then show anything: no unaudited unmask."""
    settings, masker = load_keys(context)
    for position, token in enumerate(args.tokens, start=1):
        canonical = canonical_spelling(token)
        if canonical is not None and canonical != token:
            # Another spelling of a stored token: its audit fingerprint would match no stored row.
            return fail(
                f"token {position} is not in its canonical spelling (as stored in user_logins): copy the "
                "token exactly as stored; nothing was unmasked",
                EXIT_CONFIG,
            )
    values, errors = _decrypt(args.tokens, masker, settings.database_url)
    AuditLog(settings.database_url).record(  # AuditUnavailable: nothing is shown (cli.exit_codes)
        UnmaskAudit.of(args.requested_by or os_user(), args.reason, args.tokens, failed=len(errors))
    )
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return EXIT_UNMASK_FAILED  # print nothing rather than a list that no longer lines up
    for value in values:
        print(value if args.raw else escape_controls(value))
    return EXIT_OK


def _decrypt(tokens: list[str], masker: Masker, dsn: str) -> tuple[list[str], list[str]]:
    """The values, and an `error:` line for each token that does not decrypt."""
    values: list[str] = []
    errors: list[str] = []
    foreign: set[int] | None = None  # versions the database records with another key; looked up once
    for position, token in enumerate(tokens, start=1):
        try:
            values.append(masker.unmask(token))
        except MaskingError as exc:
            reason = str(exc)
            version = _version_or_none(token)
            if version in masker.versions:
                if foreign is None:
                    foreign = set(key_mismatches(dsn, masker.check_values))
                if version in foreign:
                    reason = (
                        f"made by a different key with version {version}: the database records another key "
                        f"under version {version} than the one this keyring holds; unmask it with that key"
                    )
            errors.append(f"error: token {position}: {reason}")
    return values, errors


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


def _version_or_none(token: str) -> int | None:
    try:
        return token_version(token)
    except MaskingError:
        return None
