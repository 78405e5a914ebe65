"""The sink's contract: scenario functions run on FakeSink sessions over one FakeTables
(tests/unit/test_contract_fake.py) and on PostgresWriter sessions over the real PostgreSQL
(tests/integration/test_contract_sink.py). A scenario gets `open_sessions(n)`, n writer sessions
on one database, and `stored()`, what the tables hold: ([(message_id, create_date)] of user_logins,
[message_id] of user_logins_rejected), each row once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date
from typing import Protocol

from etl.transform import reject, transform
from models import MaskedLogin, ReceivedMessage, Rejection, WriteResult
from tests.fake_queue import MIDNIGHT_MS
from tests.fakes import MASKER, body


class Session(Protocol):
    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult: ...


OpenSessions = Callable[[int], list[Session]]
Stored = Callable[[], tuple[list[tuple[str, date]], list[str]]]


def login(n: int, sent_ms: int | None = MIDNIGHT_MS - 5_000) -> MaskedLogin:
    row = transform(ReceivedMessage(f"m{n:04d}", "h", body(n), sent_ms), MASKER)
    assert isinstance(row, MaskedLogin)
    return row


def rejection(n: int, sent_ms: int | None = MIDNIGHT_MS - 5_000, *, receive_count: int = 1) -> Rejection:
    message = ReceivedMessage(f"m{n:04d}", "h", "not json", sent_ms, receive_count=receive_count)
    return reject(message, MASKER, "body is not valid JSON", "not_json")


def a_redelivered_batch_is_stored_once(open_sessions: OpenSessions, stored: Stored) -> None:
    [session] = open_sessions(1)
    first = session.write([login(n) for n in range(10)], [])
    again = session.write([login(n) for n in range(5, 15)], [])  # half of it stored already
    assert (first.inserted, again.inserted, again.duplicates) == (10, 5, 5)
    logins, _ = stored()
    assert sorted(logins) == sorted({(f"m{n:04d}", login(n).create_date) for n in range(15)})


def the_key_is_the_message_id_and_its_day(open_sessions: OpenSessions, stored: Stored) -> None:
    """user_logins is unique on (message_id, create_date) in each daily partition: the same id on
    another day is another row (it cannot happen: create_date is a function of the message)."""
    [session] = open_sessions(1)
    before, after = login(1, MIDNIGHT_MS - 1), login(1, MIDNIGHT_MS)
    assert before.create_date != after.create_date
    assert session.write([before], []).inserted == 1
    assert session.write([after], [], redelivered=True).inserted == 1
    assert Counter(message_id for message_id, _ in stored()[0]) == {"m0001": 2}


def a_message_is_stored_in_one_table_within_a_session(open_sessions: OpenSessions, stored: Stored) -> None:
    [session] = open_sessions(1)
    session.write([login(1)], [rejection(2)])
    assert session.write([], [rejection(1)]).rejected == 0  # loaded: not quarantined
    assert session.write([login(2)], [], redelivered=True).inserted == 0  # quarantined: not loaded
    logins, rejections = stored()
    assert [m for m, _ in logins] == ["m0001"] and rejections == ["m0002"]


def two_writers_at_once_store_each_message_once(open_sessions: OpenSessions, stored: Stored) -> None:
    sessions = open_sessions(2)
    rows = [login(n) for n in range(200)]
    inserted: list[int] = []
    start = threading.Barrier(len(sessions))

    def write(session: Session, order: list[MaskedLogin]) -> None:
        start.wait()
        for at in range(0, len(order), 10):
            inserted.append(session.write(order[at : at + 10], []).inserted)

    threads = [
        threading.Thread(target=write, args=(session, rows if n == 0 else rows[::-1]))
        for n, session in enumerate(sessions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(inserted) == 200
    logins, _ = stored()
    assert len(logins) == len(set(logins)) == 200


def a_first_delivery_quarantined_by_another_session_is_not_loaded(open_sessions: OpenSessions, stored: Stored) -> None:
    """A message in one table, never both, across consumers: one consumer holds a first delivery
    while SQS hands the message to another, which quarantines it (its copy failed --max-receives
    times); the first then writes its batch (received before that quarantine)."""
    quarantining, loading = open_sessions(2)
    received = time.monotonic()
    quarantining.write([], [rejection(1, receive_count=6)])
    loading.write([login(n) for n in range(10)], [], received_since=received)
    logins, rejections = stored()
    assert rejections == ["m0001"]
    assert sorted(m for m, _ in logins) == [f"m{n:04d}" for n in range(10) if n != 1], "m0001 is in both tables"


def a_redelivered_copy_of_a_message_another_session_quarantined_is_not_loaded(
    open_sessions: OpenSessions, stored: Stored
) -> None:
    quarantining, loading = open_sessions(2)
    quarantining.write([], [rejection(1, receive_count=6)])
    loading.write([login(1), login(2)], [], redelivered=True, received_since=time.monotonic())
    logins, rejections = stored()
    assert rejections == ["m0001"] and [m for m, _ in logins] == ["m0002"]


def loading_and_quarantining_at_once_store_each_message_in_one_table(
    open_sessions: OpenSessions, stored: Stored
) -> None:
    """Two consumers at once, one loading first deliveries, the other quarantining redelivered
    copies of the same messages in the opposite order: every message ends in exactly one table."""
    loading, quarantining = open_sessions(2)
    ids = range(200)
    received = time.monotonic()
    start = threading.Barrier(2)

    def load() -> None:
        start.wait()
        for at in range(0, len(ids), 10):
            loading.write([login(n) for n in ids[at : at + 10]], [], received_since=received)

    def quarantine() -> None:
        start.wait()
        for at in range(len(ids), 0, -10):
            quarantining.write([], [rejection(n, receive_count=6) for n in ids[at - 10 : at]])

    threads = [threading.Thread(target=load), threading.Thread(target=quarantine)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    logins, rejections = stored()
    loaded = [m for m, _ in logins]
    assert not set(loaded) & set(rejections), f"in both tables: {sorted(set(loaded) & set(rejections))[:5]}"
    assert sorted(loaded + rejections) == [f"m{n:04d}" for n in ids]


SCENARIOS = [
    a_redelivered_batch_is_stored_once,
    the_key_is_the_message_id_and_its_day,
    a_message_is_stored_in_one_table_within_a_session,
    two_writers_at_once_store_each_message_once,
    a_first_delivery_quarantined_by_another_session_is_not_loaded,
    a_redelivered_copy_of_a_message_another_session_quarantined_is_not_loaded,
    loading_and_quarantining_at_once_store_each_message_in_one_table,
]
