"""The analysts' data for the integration tests of the token indexes and of the snapshot (issue 18):
logins over several days, partitions and layouts, written as the ETL writes them (a redelivered
batch, quarantined messages), rekeyed, and the duplicates view counted by hand."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg2

from database import partitions
from database.rekey import Rekeyer
from database.sqs_postgres import PostgresWriter
from helpers import query
from models import MaskedLogin, Rejection, WriteResult

TODAY = datetime.now(timezone.utc).date()
OLD_DAY = TODAY - timedelta(days=10)  # dropped by retention --keep-days 3
FAR_DAY = date(2041, 5, 6)  # the default partition


def sample_logins() -> list[MaskedLogin]:
    """Logins over four days and the default partition: devices and IPs shared by users."""
    return [
        MaskedLogin(
            f"m-{n}",
            f"user-{n % 7}",
            "ios",
            f"v1.ip{n % 5}",
            f"v1.dev{n % 9}",
            None,
            "2.3.0",
            (TODAY, TODAY - timedelta(days=1), OLD_DAY, FAR_DAY)[n % 4],
            None if n % 11 == 0 else f"v1.net{n % 3}",  # NULL: an ip that is not an IP address
        )
        for n in range(60)
    ]


# Rows of the original exercise's table, moved in by the migration: no message id, NULL tokens.
LEGACY = [
    MaskedLogin(
        None,  # type: ignore[arg-type]
        f"user-{n}",
        "ios",
        None if n % 2 else "v1.ip1",  # type: ignore[arg-type]
        None if n < 2 else "v1.dev1",  # type: ignore[arg-type]
        None,
        "1",
        TODAY,
    )
    for n in range(4)
]


def insert_legacy(database_url: str) -> None:
    for r in LEGACY:
        query(
            database_url,
            "INSERT INTO user_logins (user_id, masked_ip, masked_device_id, create_date) VALUES (%s, %s, %s, %s)",
            (r.user_id, r.masked_ip, r.masked_device_id, r.create_date),
        )


def add_day(database_url: str, day: date) -> None:
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        partitions.ensure_days(cur, [day])
    conn.close()


def load_logins(database_url: str) -> list[MaskedLogin]:
    """Write sample_logins() as the ETL does: one batch delivered again (straight and as a
    redelivery), quarantined messages (one of them a message already loaded), an OLD_DAY partition;
    then the legacy rows. Return the rows stored."""
    logins = sample_logins()
    writer = PostgresWriter(database_url)
    writer.connect()
    add_day(database_url, OLD_DAY)
    try:
        assert writer.write(logins[:40], []) == WriteResult(40, 0, 0)
        assert writer.write(logins, []) == WriteResult(20, 0, 40)
        assert writer.write(logins[30:], [], redelivered=True) == WriteResult(0, 0, 30)
        quarantined = [Rejection(f"r-{n}", "not JSON", "v1.body", None, 1) for n in range(3)]
        assert writer.write([], [*quarantined, Rejection("m-1", "late", "v1.body", None, 2)]).rejected == 3
    finally:
        writer.close()
    insert_legacy(database_url)
    return logins + LEGACY


def retoken(token: str) -> str:
    """A new token per old one, as under a new key."""
    return "k2." + token[::-1]


def rekey_all(database_url: str, stored: list[MaskedLogin]) -> list[MaskedLogin]:
    """Rewrite every token with `retoken` by a real rekey run; return the rows as now stored."""
    Rekeyer(database_url, retoken, current_prefixes=("k2.",)).run()
    return [
        MaskedLogin(
            r.message_id,
            r.user_id,
            r.device_type,
            r.masked_ip and retoken(r.masked_ip),
            r.masked_device_id and retoken(r.masked_device_id),
            r.locale,
            r.app_version,
            r.create_date,
            r.masked_network and retoken(r.masked_network),
        )
        for r in stored
    ]


def by_hand(rows: list[MaskedLogin]) -> list[tuple[Any, ...]]:
    """The view's rows counted in Python from the logins stored (field, token, logins, users, first, last)."""
    seen: dict[tuple[str, str], list[MaskedLogin]] = defaultdict(list)
    for row in rows:
        for field, token in (
            ("device_id", row.masked_device_id),
            ("ip", row.masked_ip),
            ("network", row.masked_network),
        ):
            if token is not None:
                seen[field, token].append(row)
    return sorted(
        (
            field,
            token,
            len(group),
            len({r.user_id for r in group}),
            min(r.create_date for r in group),
            max(r.create_date for r in group),
        )
        for (field, token), group in seen.items()
        if len(group) > 1
    )
