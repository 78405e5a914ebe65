"""The errors of the database package: one root, DatabaseError, and the leaves a caller acts on."""

from __future__ import annotations

from models import MaskedLogin, Rejection


class DatabaseError(Exception):
    """Root of the errors raised by this package."""


class DatabaseUnavailable(DatabaseError):
    """Raised when PostgreSQL cannot be reached or the connection broke; retry later."""


class SchemaBusy(DatabaseUnavailable):
    """Raised when a schema migration gave up waiting for a lock (an open transaction holds it); retry later."""


class KeyMismatch(DatabaseError):
    """Raised when a key version of the keyring is recorded in the database with another key (key_checks)."""


class DatabaseRejectedRows(DatabaseError):
    """Raised when PostgreSQL refused data in a batch: the rows it refuses alone, with the reason."""

    def __init__(self, bad_logins: list[tuple[MaskedLogin, str]], bad_rejections: list[tuple[Rejection, str]]) -> None:
        super().__init__(f"{len(bad_logins) + len(bad_rejections)} row(s) refused by PostgreSQL")
        self.bad_logins = bad_logins
        self.bad_rejections = bad_rejections
