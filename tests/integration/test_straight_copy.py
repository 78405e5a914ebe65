"""The straight COPY of a batch of first deliveries (PostgresWriter._copy_straight): the quarantine
lock, the epoch check and the COPY in one round trip; when a redelivered copy was quarantined
since the writer last read the epoch, the batch is written staged instead, and the message
stays in one table.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import psycopg2

from database.sqs_postgres import PostgresWriter
from etl.transform import reject, transform
from models import MaskedLogin, ReceivedMessage
from tests.fakes import MASKER, body


def _message(n: int, receive_count: int = 1) -> ReceivedMessage:
    sent = int(datetime.now(timezone.utc).timestamp() * 1000)
    return ReceivedMessage(f"straight-{uuid.uuid4()}", "h", body(n), sent, receive_count=receive_count)


def _login(message: ReceivedMessage) -> MaskedLogin:
    row = transform(message, MASKER)
    assert isinstance(row, MaskedLogin)
    return row


def _tables_holding(database_url: str, message_id: str) -> list[str]:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT 'user_logins' FROM user_logins WHERE message_id = %s "
            "UNION ALL SELECT 'user_logins_rejected' FROM user_logins_rejected WHERE message_id = %s",
            (message_id, message_id),
        )
        return sorted(row[0] for row in cur.fetchall())


def test_a_batch_received_after_a_quarantine_of_its_copy_is_written_staged_and_stored_once(database_url: str) -> None:
    # GIVEN a writer that read the quarantine epoch at connect, and another consumer that then
    # quarantines a redelivered copy of message X (bumping the epoch)
    loader, quarantiner = PostgresWriter(database_url), PostgresWriter(database_url)
    loader.connect()
    quarantiner.connect()
    try:
        first = loader.write([_login(_message(1))], [], received_since=time.monotonic())  # straight
        assert first.inserted == 1
        x = _message(2)
        copy = ReceivedMessage(x.message_id, "h2", "not json", x.sent_timestamp_ms, receive_count=2)
        assert quarantiner.write([], [reject(copy, MASKER, "not JSON", "not_json")]).rejected == 1
        # WHEN the loader writes a batch holding X's first delivery, received after the loader's
        # last reading of the epoch (so only the check under the lock can see the quarantine)
        others = [_message(n) for n in range(3, 6)]
        result = loader.write([_login(m) for m in [x, *others]], [], received_since=time.monotonic())
        # THEN the batch went staged: X is in the quarantine only, the others are loaded
        assert result.inserted == 3 and result.duplicates == 1
        assert _tables_holding(database_url, x.message_id) == ["user_logins_rejected"]
        assert all(_tables_holding(database_url, m.message_id) == ["user_logins"] for m in others)
        # and the next batch goes straight again, the epoch read afresh
        assert loader.write([_login(_message(7))], [], received_since=time.monotonic()).inserted == 1
    finally:
        loader.close()
        quarantiner.close()
