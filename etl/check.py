"""`check`: every dependency of a run, as a checklist with a fix for each failure. Changes nothing.

Kept out of the CLI module: main.py only prints the lines and maps the outcome to an exit code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from aws.sqs import QueueUnusable, SqsError, SqsReader
from config import ConfigError, Settings, redact_dsn
from database import key_checks, network_backfill, snapshot
from database.errors import DatabaseError
from database.schema import SCHEMA_VERSION
from database.sqs_postgres import PostgresWriter
from pii.keys import KmsUnavailable
from pii.masking import MaskingError

KEY_CHECKS_SCHEMA = 6  # the schema version that records key check values (database/key_checks.py)


class Failure(Enum):
    """What kind of thing failed: the configuration (exit 2) or a service (exit 3)."""

    CONFIGURATION = "configuration"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Item:
    """One line of the checklist."""

    passed: bool
    what: str
    fix: str = ""
    failure: Failure = Failure.SERVICE

    def __str__(self) -> str:
        if self.passed:
            return f"✓ {self.what}"
        return f"✗ {self.what}\n    fix: {self.fix}" if self.fix else f"✗ {self.what}"


def checklist_from_env(env: Mapping[str, str]) -> Iterator[Item]:
    """The configuration read from `env` (a failure is the only item then), then the checklist."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        yield Item(False, f"configuration: {exc}", failure=Failure.CONFIGURATION)
        return
    yield from checklist(settings)


def checklist(settings: Settings) -> Iterator[Item]:
    """Check the keys, the queue and its dead-letter queue, PostgreSQL and its schema, in that order."""
    item, checks = _keys(settings)
    yield item
    yield from _queue(settings)
    yield from _database(settings, checks)


def _keys(settings: Settings) -> tuple[Item, dict[int, str] | None]:
    """The keys' item, and their check values (None if they did not load)."""
    try:
        masker = settings.load_masker()
    except KmsUnavailable as exc:
        return Item(False, f"masking keys: {exc}", "fix AWS_ENDPOINT_URL_KMS / the network, or retry later"), None
    except MaskingError as exc:  # a KMS refusal, one key under two versions: configuration
        return Item(
            False, f"masking keys: {exc}", "fix the key source (docs/keys-and-privacy.md)", Failure.CONFIGURATION
        ), None
    return Item(
        True,
        f"configuration valid; masking keys loaded from {settings.key_source.origin}: "
        f"{_versions(settings.key_source.versions)}, new tokens use version {masker.version}",
    ), masker.check_values


def _queue(settings: Settings) -> Iterator[Item]:
    reader = SqsReader(
        settings.queue_url,
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        wait_time_seconds=0,
        max_attempts=1,
    )
    try:
        attributes = reader.check()
    except QueueUnusable as exc:
        yield Item(
            False,
            f"SQS queue missing or forbidden: {exc}",
            "create it (scripts/init-queue.sh) or fix SQS_QUEUE_URL / AWS credentials",
        )
        return
    except SqsError as exc:
        yield Item(
            False, f"SQS unreachable: {exc}", "start the emulator (scripts/stack.sh start) or fix AWS_ENDPOINT_URL"
        )
        return
    yield Item(True, f"SQS queue {settings.queue_url} reachable")
    dlq_arn = json.loads(attributes.get("RedrivePolicy", "{}")).get("deadLetterTargetArn")
    if dlq_arn:
        dlq_url = settings.queue_url.rsplit("/", 1)[0] + "/" + dlq_arn.rsplit(":", 1)[-1]
        try:
            depth = (
                SqsReader(dlq_url, endpoint_url=settings.endpoint_url, region=settings.region, max_attempts=1)
                .check()
                .get("ApproximateNumberOfMessages", "?")
            )
            yield Item(True, f"dead-letter queue {dlq_url} exists ({depth} messages)")
        except SqsError as exc:
            yield Item(
                False,
                f"dead-letter queue {dlq_url} missing: {exc}",
                "create it (scripts/init-queue.sh) or fix the queue's RedrivePolicy",
            )


def _database(settings: Settings, checks: dict[int, str] | None) -> Iterator[Item]:
    writer = PostgresWriter(settings.database_url)
    dsn = redact_dsn(settings.database_url)
    try:
        writer.connect(migrate=False)
        yield Item(True, f"PostgreSQL {dsn} reachable")
        version = writer.schema_version()
        problem = writer.schema_problem()
        if problem == "tables missing":  # a fresh database: the ETL creates its tables at start
            yield Item(True, "schema: not created yet; the ETL creates it at its first run")
        elif version is not None and version < SCHEMA_VERSION:  # an upgrade: the ETL migrates at start
            yield Item(True, f"schema: version {version}; the ETL migrates it to {SCHEMA_VERSION} at start")
        elif version is not None and version > SCHEMA_VERSION:
            # A newer release migrated it (a rolling update): its additive schema serves this one.
            yield Item(
                True,
                f"schema: version {version}, newer than this release's {SCHEMA_VERSION}; "
                "this release runs on it without migrating",
            )
        else:
            age = snapshot.describe(settings.database_url) if problem is None else ""
            yield Item(
                problem is None,
                f"schema: {'current' + age if problem is None else problem}",
                "run `python main.py` once: it creates and migrates the schema at start",
            )
        if checks is not None and version is not None and version >= KEY_CHECKS_SCHEMA:
            yield _key_checks(checks, writer.recorded_key_checks())
        if problem is None:
            yield _token_indexes(writer.closed_partitions_unindexed())
            yield _network_tokens(network_backfill.lacking(settings.database_url))
    except DatabaseError as exc:
        yield Item(
            False,
            f"PostgreSQL {dsn} unreachable: {exc}",
            "start PostgreSQL (scripts/stack.sh start) or fix DATABASE_URL",
        )
    finally:
        writer.close()


def _key_checks(held: dict[int, str], recorded: dict[int, str]) -> Item:
    """Whether each key version held is the key the database knows under that version (key_checks)."""
    wrong = key_checks.mismatched(held, recorded)
    if wrong:
        return Item(
            False,
            f"keys: {key_checks.mismatch_message(wrong)}",
            "see docs/keys-and-privacy.md#one-version-one-key",
            Failure.CONFIGURATION,
        )
    known = sorted(set(held) & set(recorded))
    if not known:
        return Item(True, "keys: the database knows no key version of this keyring yet; the ETL records them")
    return Item(True, f"keys: {_versions(known)} the same key{'s' if len(known) > 1 else ''} as the database's")


def _token_indexes(unindexed: int) -> Item:
    """Informational (never fails the check): closed days still without the analysts' token indexes."""
    if unindexed == 0:
        return Item(True, "token indexes: every closed partition has them")
    return Item(
        True,
        f"token indexes: {unindexed} closed partition(s) not indexed yet; the running ETL builds them "
        "in the background (CONCURRENTLY), as does the nightly `python main.py snapshot`",
    )


def _network_tokens(lacking: int) -> Item:
    """Informational (never fails the check): rows stored before schema 7 still without a network token."""
    if lacking == 0:
        return Item(True, "network tokens: every row of an IP address has one")
    return Item(
        True,
        f"network tokens: {lacking} rows stored before schema 7 lack one; run `python main.py backfill-networks` "
        "(needs the key; resumable)",
    )


def _versions(versions: Sequence[int]) -> str:
    return f"version{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"
