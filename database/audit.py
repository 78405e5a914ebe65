"""AuditLog: the `pii_unmask_audit` table, written before any unmasked value is shown.

The order is the guarantee: `unmask` decrypts in memory, commits its audit row, and only then
prints. If the row cannot be committed (database unreachable, no INSERT right), nothing is shown:
there is no unaudited unmask. The row holds who asked (`--requested-by` and the database role),
why, how many tokens and a fingerprint of each, never a value or a token.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from database.audit_tables import audit_table
from database.connection import first_line, open_connection
from database.errors import DatabaseError, DatabaseUnavailable

logger = logging.getLogger(__name__)

AUDIT_DDL = (Path(__file__).parent / "audit.sql").read_text(encoding="utf-8")
# Any constant: serialises the creation of the table by two first unmasks at once.
_AUDIT_LOCK_ID = 7_412_350_192


# A token is named in the audit by the first 16 hex digits of its SHA-256: enough to find its row
# (`left(encode(sha256(convert_to(masked_ip, 'UTF8')), 'hex'), 16)`), useless for learning the value.
FINGERPRINT_HEX_DIGITS = 16


def token_fingerprint(token: str) -> str:
    """The audit's name for a token: a SHA-256 prefix of the token (a ciphertext), never the value."""
    return hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX_DIGITS]


@dataclass(frozen=True, slots=True)
class UnmaskAudit:
    """One `unmask` call as recorded in `pii_unmask_audit`: who, why, which tokens (fingerprints only)."""

    requested_by: str
    reason: str
    fingerprints: tuple[str, ...]
    failed: int = 0  # tokens that did not unmask (nothing is shown then)

    @classmethod
    def of(cls, requested_by: str, reason: str, tokens: list[str] | tuple[str, ...], failed: int = 0) -> UnmaskAudit:
        """The audit entry of a call on `tokens`."""
        return cls(requested_by, reason, tuple(token_fingerprint(t) for t in tokens), failed)


class AuditUnavailable(DatabaseError):
    """Raised when the audit row could not be committed; the unmask must not go ahead."""


class AuditLog:
    """Writes one audit row per unmask call, each in its own committed transaction."""

    def __init__(self, dsn: str, *, connect_timeout_seconds: int = 5) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout_seconds

    def __repr__(self) -> str:
        return "AuditLog()"  # the DSN may hold a password

    def record(self, entry: UnmaskAudit) -> None:
        """Commit `entry`; raise AuditUnavailable if it is not committed."""
        try:
            conn = open_connection(
                self._dsn, connect_timeout=self._connect_timeout, application_name="login-etl-unmask"
            )
        except DatabaseUnavailable as exc:
            raise AuditUnavailable(f"PostgreSQL unreachable: {exc}") from None
        try:
            with conn, conn.cursor() as cur:
                # AuditTableUnsafe (missing where this role may not create it, or not append-only
                # for it) passes through: main.py says to run roles.sql.
                table = audit_table(cur, "pii_unmask_audit", AUDIT_DDL, _AUDIT_LOCK_ID)
                cur.execute(
                    sql.SQL(
                        """INSERT INTO {}
                           (requested_by, reason, token_count, failed_count, token_fingerprints)
                       VALUES (%s, %s, %s, %s, %s)"""
                    ).format(table),
                    (entry.requested_by, entry.reason, len(entry.fingerprints), entry.failed, list(entry.fingerprints)),
                )
        except psycopg2.Error as exc:
            code = exc.pgcode or type(exc).__name__
            raise AuditUnavailable(f"the audit row was not written ({code}: {first_line(exc)})") from None
        finally:
            conn.close()
        logger.info("unmask audited: %d token(s) for %s", len(entry.fingerprints), entry.requested_by)
