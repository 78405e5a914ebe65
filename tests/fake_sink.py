"""PostgresWriter's tables and transactions in memory: the model behind the loop's unit tests and
the simulation (tests/integration/test_contract_sink.py runs the same scenarios on PostgreSQL).

- `FakeTables` is one database: `user_logins` keyed like its daily partitions' unique index,
  (message_id, create_date); `user_logins_rejected` keyed by message_id; and `inserts`, every row
  ever inserted, so that a second copy of a message is seen even where a key would hide it.
- `FakeSink` is one writer's session on them (many may share one FakeTables). A write is one
  transaction under READ COMMITTED, as PostgresWriter's are: each statement's NOT EXISTS reads what
  was committed when it started (and the transaction's own rows); the unique indexes see every
  commit (ON CONFLICT DO NOTHING waits for a concurrent insert of the same key, then skips it).
  Between reading and writing, `interleave()` lets another session's transaction run.
- The quarantine lock: a transaction that writes a `redelivered` batch or quarantines a message
  received more than once holds it alone (and, for the latter, bumps the epoch); every other one
  shares it. Between two transactions that hold it alone, or one that does and one that shares
  it, nothing interleaves.
- The straight path: a batch not marked `redelivered`, whose first receive (`received_since`) came
  after a read of the epoch equal to the epoch now, is COPYed with no one-table check; a key
  already there fails the COPY, and the batch goes through the staged INSERT (NOT EXISTS on the
  quarantine, ON CONFLICT DO NOTHING), as do the next STAGED_BATCHES_AFTER_CONFLICT batches.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date

from database.errors import DatabaseRejectedRows, DatabaseUnavailable, SchemaBusy
from database.sqs_postgres import STAGED_BATCHES_AFTER_CONFLICT
from models import MaskedLogin, Rejection, WriteResult
from tests.fake_queue import FakeClock, Faults


class SharedLock:
    """One advisory lock key: pg_advisory_xact_lock_shared (many at once) and pg_advisory_xact_lock
    (alone); a waiting exclusive request holds up later shared ones, as PostgreSQL's lock queue does."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharers = 0
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def held(self, *, exclusive: bool) -> Iterator[None]:
        with self._changed:
            if exclusive:
                self._waiting_alone += 1
                while self._alone or self._sharers:
                    self._changed.wait()
                self._waiting_alone -= 1
                self._alone = True
            else:
                while self._alone or self._waiting_alone:
                    self._changed.wait()
                self._sharers += 1
        try:
            yield
        finally:
            with self._changed:
                if exclusive:
                    self._alone = False
                else:
                    self._sharers -= 1
                self._changed.notify_all()


class FakeTables:
    """The two tables, shared by every FakeSink on them; `lock` makes a statement atomic."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.quarantine_lock = SharedLock()
        self.epoch = 0  # etl_quarantine_epoch
        self.logins: dict[tuple[str, date], MaskedLogin] = {}
        self.rejections: dict[str, Rejection] = {}
        # Every row inserted: (table, message_id, session, how: "copy" | "staged" | "quarantine" | "set-up").
        self.inserts: list[tuple[str, str, str, str]] = []

    def add_login(self, row: MaskedLogin) -> None:
        """Insert a row as another process would have (a test's set-up)."""
        with self.lock:
            self.logins[(row.message_id, row.create_date)] = row
            self.inserts.append(("user_logins", row.message_id, "test", "set-up"))

    def login_ids(self) -> dict[str, MaskedLogin]:
        with self.lock:
            return {message_id: row for (message_id, _), row in self.logins.items()}

    def copies(self) -> list[str]:
        """Message ids stored more than once: two login rows, or a login and a quarantine row."""
        with self.lock:
            counts = Counter(message_id for _, message_id, _, _ in self.inserts)
        return sorted(message_id for message_id, n in counts.items() if n > 1)

    def inserts_of(self, message_id: str) -> list[tuple[str, str, str, str]]:
        with self.lock:
            return [insert for insert in self.inserts if insert[1] == message_id]


class FakeSink:
    """One PostgresWriter session on `tables` (a new FakeTables by default): one atomic write per
    batch, idempotent on (message_id, create_date), a message in one table only where PostgresWriter
    checks it, rows it refuses alone (`refuse_logins`, `refuse_rejections`).

    It keeps what a check of the counters needs, of its own commits only: `added` (logins and
    rejections it inserted, rows offered), and `ambiguous`, what the commits that reported a failure
    (the connection lost after COMMIT) stored and were offered, which the loop cannot have counted."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        tables: FakeTables | None = None,
        refuse_logins: set[str] | None = None,
        refuse_rejections: set[str] | None = None,
        refuse_minimal: bool = False,
        clock: FakeClock | None = None,
        write_seconds: float = 0.0,
        slow_write_seconds: float = 0.0,
        interleave: Callable[[], None] = lambda: time.sleep(0),
        name: str = "",
    ) -> None:
        self.name = name
        self.faults = faults or Faults()
        self.tables = tables or FakeTables()
        self.refuse_logins = refuse_logins or set()
        self.refuse_rejections = refuse_rejections or set()
        self.refuse_minimal = refuse_minimal  # also the minimal quarantine row (no sent_at) of those ids
        self.clock = clock
        self.write_seconds = write_seconds  # virtual time a write takes
        self.slow_write_seconds = slow_write_seconds  # ... and a slow one (Faults.slow)
        self.interleave = interleave
        self.connected = False
        self.down = False  # gone for good (Faults.write_permanent), until a test sets it back
        self.commits = 0
        self.ambiguous_commits = 0
        self.added = Counter[str]()  # logins, rejections, offered: of this session's commits
        self.ambiguous = Counter[str]()  # the same, of its commits that reported failure
        self._staged_left = 0
        self._epochs: deque[tuple[float, int]] = deque(maxlen=64)  # (when, epoch) read, as PostgresWriter

    # -- what is stored --------------------------------------------------------------------------

    @property
    def logins(self) -> dict[str, MaskedLogin]:
        """The rows of user_logins by message id (a second copy: `stored_twice`)."""
        return self.tables.login_ids()

    @property
    def rejections(self) -> dict[str, Rejection]:
        return self.tables.rejections

    @property
    def stored_twice(self) -> list[str]:
        return self.tables.copies()

    @property
    def offered(self) -> int:
        return self.added["offered"]

    def holds(self, message_id: str) -> bool:
        with self.tables.lock:
            return message_id in self.tables.rejections or any(key[0] == message_id for key in self.tables.logins)

    # -- the session -----------------------------------------------------------------------------

    def connect(self) -> None:
        started = self._now()
        self.faults.tick()
        if self.down:
            self._failed(started)
            raise DatabaseUnavailable("fake: gone for good")
        if self.faults.hit(self.faults.connect_error):
            self._failed(started)
            raise SchemaBusy("fake lock wait") if self.faults.hit(0.5) else DatabaseUnavailable("fake refused")
        self.connected = True
        with self.tables.lock:
            self._epochs.append((self._time(), self.tables.epoch))

    def _failed(self, started: float) -> None:
        self.faults.failed("PostgreSQL", started, self._now())

    def _now(self) -> float:
        return self.clock.now() if self.clock else 0.0

    def _time(self) -> float:
        """The clock messages are stamped with (ReceivedMessage.received_at): the test's, or the real one."""
        return self.clock.now() if self.clock else time.monotonic()

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        started = self._now()
        self.faults.tick()
        if not self.connected:
            self._failed(started)
            raise DatabaseUnavailable("not connected")
        slow = self.faults.maybe_slow()
        if self.clock is not None:
            self.clock.advance(self.slow_write_seconds if slow else self.write_seconds)
        if self.down or self.faults.hit(self.faults.write_permanent):
            self.down, self.connected, self.faults.broken = True, False, True
            self._failed(started)
            raise DatabaseUnavailable("fake: gone for good")
        if self.faults.hit(self.faults.write_error):
            self.connected = False
            self._failed(started)
            raise DatabaseUnavailable("fake outage")
        bad_logins = [
            (row, "refused by PostgreSQL: 22001 fake") for row in logins if row.message_id in self.refuse_logins
        ]
        bad_rejections = [
            (row, "refused by PostgreSQL: 23514 fake")
            for row in rejections
            if row.message_id in self.refuse_rejections and (row.sent_at is not None or self.refuse_minimal)
        ]
        if bad_logins or bad_rejections:
            raise DatabaseRejectedRows(bad_logins, bad_rejections)
        inserted, stored = self._transaction(logins, rejections, redelivered, received_since)
        self.commits += 1
        offered = len(logins) + len(rejections)
        self.added.update(logins=inserted, rejections=len(stored), offered=offered)
        if self.faults.hit(self.faults.write_error_after_commit):
            self._failed(started)
            self.connected = False
            self.ambiguous_commits += 1
            self.ambiguous.update(logins=inserted, rejections=len(stored), offered=offered)
            raise DatabaseUnavailable("fake: connection lost after COMMIT was sent")
        self.faults.succeeded("PostgreSQL")
        return WriteResult(
            inserted=inserted,
            rejected=len(stored),
            duplicates=offered - inserted - len(stored),
            rejected_ids=frozenset(stored),
        )

    def _transaction(
        self, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection], redelivered: bool, received_since: float
    ) -> tuple[int, set[str]]:
        """PostgresWriter._write's statements, in order, with READ COMMITTED's snapshots, under the
        quarantine lock; the rows become visible to other sessions at the commit only."""
        quarantines_redelivered = any(r.receive_count > 1 for r in rejections)
        exclusive = redelivered or quarantines_redelivered
        with self.tables.quarantine_lock.held(exclusive=exclusive):
            return self._statements(
                logins, rejections, exclusive=exclusive, bump=quarantines_redelivered, received_since=received_since
            )

    def _statements(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        exclusive: bool,
        bump: bool,
        received_since: float,
    ) -> tuple[int, set[str]]:
        tables = self.tables
        with tables.lock:
            if bump:
                tables.epoch += 1
            else:
                self._epochs.append((self._time(), tables.epoch))
            baseline = next((epoch for seen_at, epoch in reversed(self._epochs) if seen_at < received_since), None)
            straight = not exclusive and baseline == tables.epoch  # a bump is exclusive
            conflict = any((row.message_id, row.create_date) in tables.logins for row in logins)
            quarantined = set(tables.rejections)
        if straight and self._staged_left == 0:
            staged = conflict  # the straight COPY failed on a key already there: rolled back, staged
            if conflict:
                self._staged_left = STAGED_BATCHES_AFTER_CONFLICT
        else:
            staged = True
            if self._staged_left:
                self._staged_left -= 1
        self.interleave()
        # Statement 1: logins (the staged path's NOT EXISTS reads the quarantine's snapshot).
        with tables.lock:
            mine = {
                (row.message_id, row.create_date): row
                for row in logins
                if (row.message_id, row.create_date) not in tables.logins
                and not (staged and row.message_id in quarantined)
            }
            loaded = set(tables.logins) | set(mine)  # statement 2's snapshot, and this transaction's rows
            rejected_before = set(tables.rejections)
        self.interleave()
        # Statement 2: quarantine rows, none for a message loaded (on its day, when it has one).
        loaded_ids = {message_id for message_id, _ in loaded}
        pending = {
            r.message_id: r
            for r in rejections
            if r.message_id not in rejected_before
            and not (
                (r.message_id, r.create_date) in loaded if r.create_date is not None else r.message_id in loaded_ids
            )
        }
        self.interleave()
        # COMMIT: a key another session committed meanwhile was waited for and skipped (ON CONFLICT).
        with tables.lock:
            inserted = 0
            for key, row in mine.items():
                if key not in tables.logins:
                    tables.logins[key] = row
                    tables.inserts.append(("user_logins", row.message_id, self.name, "staged" if staged else "copy"))
                    inserted += 1
            stored = set()
            for message_id, rejection in pending.items():
                if message_id not in tables.rejections:
                    tables.rejections[message_id] = rejection
                    tables.inserts.append(("user_logins_rejected", message_id, self.name, "quarantine"))
                    stored.add(message_id)
        return inserted, stored
