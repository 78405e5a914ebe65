"""The key commands: `keygen` (a new key or keyset), `rekey` (stored tokens under the active key) and
`backfill-networks` (the network token of rows stored before schema 7)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cli.arguments import UsageError, add_command, positive_int
from cli.exit_codes import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVICE_LOST,
    EXIT_UNMASK_FAILED,
    EXIT_UNREACHABLE,
    ErrorContext,
)
from cli.startup import DEFAULT_BACKOFF, DEFAULT_RETRY_BUDGET_SECONDS, load_keys, set_up_schema
from config import KmsSettings, Settings
from database.network_backfill import NetworkBackfill
from database.rekey import Rekeyer
from database.sqs_postgres import PostgresWriter
from pii.key_files import write_key_file
from pii.keys import generate_wrapped_key
from pii.masking import KEY_BYTES, generate_key
from pii.tink_keyset import keyset_json, new_keyset, rotated_keyset

_REWRITE_CODES = (EXIT_OK, EXIT_UNMASK_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_SERVICE_LOST)


def register(subparsers: Any) -> None:
    """Add `keygen`, `rekey` and `backfill-networks` to the subcommands."""
    _register_keygen(subparsers)
    rekey = add_command(
        subparsers,
        "rekey",
        help="rewrite stored tokens of older key versions under the active one",
        description="Rewrite the tokens in user_logins (masked_ip, masked_device_id, masked_network) and "
        "user_logins_rejected (encrypted_body) that are not of the active key (MASKING_KEY_VERSION, or the "
        "keyset's primary), legacy v<n>. tokens included, in batches of one transaction each. Safe to run "
        "while the ETL runs and to kill: a rerun resumes. Succeeds when no token of another version is left.",
        exit_codes=_REWRITE_CODES,
    )
    _add_batch_size(rekey, dest="rekey_batch_size")
    rekey.set_defaults(handler=rekey_tokens)
    backfill = add_command(
        subparsers,
        "backfill-networks",
        help="give the rows stored before schema 7 their network token (masked_network)",
        description="Fill masked_network, the network token (/24, /48) of the IP, in the rows of user_logins "
        "stored before schema 7, from their ip token (needs the key; no value is printed or stored in "
        "clear), in batches of one transaction each. Safe to run while the ETL runs and to stop: a rerun "
        "resumes. Legacy v<n>. ip tokens need `rekey` first. `check` says how many rows still lack one. "
        "Succeeds when none is left.",
        exit_codes=_REWRITE_CODES,
    )
    _add_batch_size(backfill, dest="backfill_batch_size")
    backfill.set_defaults(handler=backfill_networks)


def _add_batch_size(command: argparse.ArgumentParser, *, dest: str) -> None:
    """--batch-size of the commands that walk the tables (rekey, backfill-networks)."""
    command.add_argument(
        "--batch-size",
        dest=dest,
        type=positive_int,
        default=500,
        metavar="N",
        help="about this many rows per transaction (500)",
    )


def _register_keygen(subparsers: Any) -> None:
    keygen = add_command(
        subparsers,
        "keygen",
        help="print a new random MASKING_KEY, or a KMS-wrapped data key",
        description="Print a new random key (base64 of 64 bytes) for MASKING_KEY or MASKING_KEYS; with "
        "--kms-key-id, a new 64-byte data key wrapped by that KMS key (base64 of the CiphertextBlob, for "
        "MASKING_KEY_KMS_CIPHERTEXT): no plaintext key is printed or written.",
        exit_codes=(EXIT_OK, EXIT_CONFIG, EXIT_UNREACHABLE),
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
    keygen.set_defaults(handler=keygen_command)


def keygen_command(args: argparse.Namespace, context: ErrorContext) -> int:
    """Print a new key (or keyset), or write it whole to --output."""
    if args.kms_key_id is not None and args.key_format == "tink":
        raise UsageError("--kms-key-id makes a KMS-wrapped data key; it cannot be combined with --format tink")
    if (args.export or args.rotate) and args.key_format != "tink":
        raise UsageError("--export and --rotate print a Tink keyset: add --format tink")
    if args.replace and args.output is None:
        raise UsageError("--replace goes with --output FILE")
    if args.key_format == "tink":
        text = _tink_keyset(export=args.export, rotate=args.rotate)
    elif args.kms_key_id is None:
        text = generate_key()
    else:
        kms = KmsSettings.from_env(os.environ)
        text = generate_wrapped_key(args.kms_key_id, region=kms.region, endpoint_url=kms.endpoint_url)
    if args.output is None:
        print(text)
        return EXIT_OK
    kept = write_key_file(args.output, text, replace=args.replace)  # KeyFileError: exit 2 (cli.exit_codes)
    print(
        f"wrote {args.output} (mode 0600)" + (f"; the file it replaced is kept as {kept}" if kept else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _tink_keyset(*, export: bool, rotate: bool) -> str:
    """A new keyset of one key; or the configured keyring as a keyset (--export), plus a new primary (--rotate)."""
    if not (export or rotate):
        return new_keyset(key_bytes=KEY_BYTES)
    settings = Settings.from_env(os.environ)  # its errors, and the keys', end in cli.exit_codes
    keys = settings.key_source.load()
    return rotated_keyset(keys, key_bytes=KEY_BYTES) if rotate else keyset_json(keys, settings.key_version)


def rekey_tokens(args: argparse.Namespace, context: ErrorContext) -> int:
    """Rewrite the tokens of other key versions under the active one; exit EXIT_UNMASK_FAILED if some are left."""
    settings, masker = load_keys(context)
    # Tokens are rewritten under the active key only if the database knows no other key under one of
    # the keyring's versions (KeyMismatch: exit 2, nothing rewritten). Rekey does not migrate (its role
    # need not own the schema); it records the versions the database does not know yet.
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    try:
        writer.connect(migrate=False, register_keys=True)
    finally:
        writer.close()
    rekeyer = Rekeyer(
        settings.database_url,
        masker.rekey,
        current_prefixes=masker.current_prefixes,
        batch_rows=args.rekey_batch_size,
        backoff=DEFAULT_BACKOFF,
    )
    try:
        result = rekeyer.run()
    except KeyboardInterrupt:
        print("rekey interrupted: committed batches are kept, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(result.summary(masker.version))
    for reason, count in result.failures.most_common():
        print(f"error: {count} token(s) not rewritten: {reason}", file=sys.stderr)
    return EXIT_OK if result.remaining == 0 else EXIT_UNMASK_FAILED


def backfill_networks(args: argparse.Namespace, context: ErrorContext) -> int:
    """Fill the network tokens rows lack; exit EXIT_UNMASK_FAILED if some are left."""
    settings, masker = load_keys(context)
    # It writes tokens: like rekey, only if the database knows no other key under a version held.
    writer = PostgresWriter(settings.database_url, key_checks=masker.check_values)
    try:
        # The column comes with schema 7: migrate first, as the ETL does at start.
        set_up_schema(writer, budget_seconds=DEFAULT_RETRY_BUDGET_SECONDS, dsn=settings.database_url)
    finally:
        writer.close()
    backfill = NetworkBackfill(
        settings.database_url, masker.network_of_token, batch_rows=args.backfill_batch_size, backoff=DEFAULT_BACKOFF
    )
    try:
        result = backfill.run()
    except KeyboardInterrupt:
        print("backfill-networks interrupted: committed batches are kept, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(result.summary())
    for reason, count in result.failures.most_common():
        print(f"error: {count} ip token(s) not read: {reason}", file=sys.stderr)
    return EXIT_OK if result.remaining == 0 else EXIT_UNMASK_FAILED
