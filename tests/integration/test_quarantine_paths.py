"""The writer's two ways of writing quarantine rows (database/sqs_postgres.py, _insert_rejections):
one INSERT … VALUES statement for the usual few, COPY through the session's staging table for a
flood. The same batch gives the same rows and the same answer either way."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import psycopg2
import pytest

from database import sqs_postgres
from database.sqs_postgres import PostgresWriter
from etl.transform import reject, transform
from models import MaskedLogin, ReceivedMessage, Rejection
from tests.fakes import MASKER, body


def _message(text: str, *, dated: bool = True, receive_count: int = 1) -> ReceivedMessage:
    sent = int(datetime.now(timezone.utc).timestamp() * 1000) if dated else None
    return ReceivedMessage(f"q-{uuid.uuid4()}", "h", text, sent, receive_count=receive_count)


def _rejection(message: ReceivedMessage, reason: str = "not JSON") -> Rejection:
    return reject(message, MASKER, reason, "not_json")


def _quarantine(database_url: str) -> dict[str, tuple[object, ...]]:
    """message_id -> (reason, sent_at, receive_count, encrypted_body) of every quarantine row."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT message_id, reason, sent_at, receive_count, encrypted_body FROM user_logins_rejected")
        return {row[0]: tuple(row[1:]) for row in cur.fetchall()}


@pytest.mark.parametrize("path", ["values", "staged"])
def test_both_quarantine_paths_store_the_same_rows(database_url: str, path: str, monkeypatch) -> None:
    """GIVEN a batch of quarantine rows: dated, undated, one whose login is stored already (on its
    day), one undated whose login is stored, one quarantined already, and one reason full of
    characters COPY and SQL must escape
    WHEN the writer writes them by one path or the other
    THEN only the new ones are stored, with their fields intact, and the answer names them."""
    if path == "staged":
        monkeypatch.setattr(sqs_postgres, "VALUES_MAX_ROWS", 0)
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        loaded, loaded_undated, quarantined = _message(body(1)), _message(body(2)), _message("nope")
        login = transform(loaded, MASKER)
        undated_login = transform(loaded_undated, MASKER)
        assert isinstance(login, MaskedLogin) and isinstance(undated_login, MaskedLogin)
        writer.write([login, undated_login], [_rejection(quarantined)])
        new = [_message("bad"), _message("bad", dated=False), _message("bad", receive_count=3)]
        tricky = _rejection(_message("bad"), "quote ' backslash \\ tab \t newline \n end")
        batch = [
            *(_rejection(m) for m in new),
            tricky,
            _rejection(ReceivedMessage(loaded.message_id, "h2", "x", loaded.sent_timestamp_ms, receive_count=2)),
            _rejection(ReceivedMessage(loaded_undated.message_id, "h3", "x", None, receive_count=2)),
            _rejection(ReceivedMessage(quarantined.message_id, "h4", "x", None, receive_count=2)),
        ]
        result = writer.write([], batch)
    finally:
        writer.close()
    expected = {m.message_id for m in new} | {tricky.message_id}
    assert result.rejected_ids == frozenset(expected)
    assert (result.rejected, result.duplicates) == (4, 3)
    stored = _quarantine(database_url)
    assert set(stored) == expected | {quarantined.message_id}
    for rejection in batch[:4]:  # every field as given, the sent time to the microsecond
        fields = (rejection.reason, rejection.sent_at, rejection.receive_count, rejection.encrypted_body)
        assert stored[rejection.message_id] == fields
    assert stored[new[1].message_id][1] is None  # undated
