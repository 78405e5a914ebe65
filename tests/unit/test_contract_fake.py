"""The contracts on the fakes: SQS's (tests/contract_sqs.py) on FakeQueue, the writer's
(tests/contract_sink.py) on FakeSink; the same scenarios run on the emulators and on PostgreSQL in
tests/integration/test_contract_sqs.py and test_contract_sink.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import date

import pytest

from models import ReceivedMessage
from tests import contract_sink as sink_contract
from tests.contract_sink import OpenSessions, Session, Stored
from tests.contract_sqs import (
    FAKE_ONLY_FIFO_SCENARIOS,
    FIFO_SCENARIOS,
    SCENARIOS,
    FifoQueueUnderTest,
    QueueUnderTest,
)
from tests.fake_fifo_queue import FakeFifoQueue
from tests.fakes import FakeClock, FakeQueue, FakeSink, FakeTables


class FakeUnderTest:
    """A FakeQueue on its own virtual clock: sleeping takes no time."""

    def __init__(self, visibility_timeout_seconds: int, max_receive_count: int | None = None) -> None:
        self.clock = FakeClock()
        self.queue = FakeQueue(
            [],
            clock=self.clock,
            visibility_timeout_seconds=visibility_timeout_seconds,
            max_receive_count=max_receive_count,
        )
        self.queue.empty_wait_seconds = 0.0

    def send(self, body: str) -> str:
        return self.queue.send(body)

    def receive(self) -> list[ReceivedMessage]:
        return self.queue.receive()

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        return self.queue.delete(messages)

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        return self.queue.change_visibility(messages, timeout_seconds)

    def now(self) -> float:
        return self.clock.now()

    def sleep_until(self, when: float) -> None:
        self.clock.advance(when - self.clock.now())

    def dead_letters(self) -> list[str]:
        return list(self.queue.dead_letters)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_the_fake_queue_keeps_the_sqs_contract(scenario: Callable[..., None]) -> None:
    def make(visibility_timeout_seconds: int, max_receive_count: int | None = None) -> QueueUnderTest:
        return FakeUnderTest(visibility_timeout_seconds, max_receive_count)

    scenario(make)


class FakeFifoUnderTest:
    """A FakeFifoQueue on its own virtual clock."""

    def __init__(self, visibility_timeout_seconds: int = 30, *, content_based_deduplication: bool = False) -> None:
        self.clock = FakeClock()
        self.queue = FakeFifoQueue(
            clock=self.clock,
            visibility_timeout_seconds=visibility_timeout_seconds,
            content_based_deduplication=content_based_deduplication,
        )
        self.queue.empty_wait_seconds = 0.0
        self.queue.long_poll_seconds = 0.0  # as the emulators' reader: no long poll

    def send(self, body: str, *, group: str, deduplication_id: str | None = None) -> str:
        return self.queue.send(body, group=group, deduplication_id=deduplication_id)

    def receive(self) -> list[ReceivedMessage]:
        return self.queue.receive()

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        return self.queue.delete(messages)

    def now(self) -> float:
        return self.clock.now()

    def sleep_until(self, when: float) -> None:
        self.clock.advance(when - self.clock.now())


@pytest.mark.parametrize(
    "scenario", [*FIFO_SCENARIOS, *FAKE_ONLY_FIFO_SCENARIOS], ids=lambda scenario: scenario.__name__
)
def test_the_fake_fifo_queue_keeps_the_fifo_contract(scenario: Callable[..., None]) -> None:
    def make_fifo(
        visibility_timeout_seconds: int = 30, *, content_based_deduplication: bool = False
    ) -> FifoQueueUnderTest:
        return FakeFifoUnderTest(visibility_timeout_seconds, content_based_deduplication=content_based_deduplication)

    scenario(make_fifo)


def fake_database() -> tuple[OpenSessions, Stored]:
    tables = FakeTables()

    def open_sessions(count: int) -> list[Session]:
        sessions = [FakeSink(tables=tables, name=f"s{n}") for n in range(count)]
        for session in sessions:
            session.connect()
        return list(sessions)

    def stored() -> tuple[list[tuple[str, date]], list[str]]:
        return list(tables.logins), sorted(tables.rejections)

    return open_sessions, stored


@pytest.mark.parametrize("scenario", sink_contract.SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_the_fake_sink_keeps_the_writers_contract(scenario: Callable[..., None]) -> None:
    scenario(*fake_database())


def test_first_deliveries_go_straight_unless_a_redelivered_copy_was_quarantined_since_their_receive() -> None:
    """The cost side of the one-table promise: the common batch (first deliveries, nothing quarantined
    from a redelivery meanwhile) is COPYed with no look at the quarantine; only a batch received
    before another session's quarantine of a redelivered message takes the staged INSERT."""
    tables = FakeTables()
    loading, quarantining = FakeSink(tables=tables, name="a"), FakeSink(tables=tables, name="b")
    loading.connect()
    quarantining.connect()
    before = time.monotonic()
    loading.write([sink_contract.login(0)], [], received_since=time.monotonic())
    quarantining.write([], [sink_contract.rejection(9, receive_count=1)])  # a first delivery's rejection: no bump
    loading.write([sink_contract.login(1)], [], received_since=time.monotonic())
    quarantining.write([], [sink_contract.rejection(8, receive_count=6)])
    loading.write([sink_contract.login(2)], [], received_since=before)  # received before that quarantine
    loading.write([sink_contract.login(3)], [], received_since=time.monotonic())
    loading.write([sink_contract.login(4)], [], received_since=0.0)  # receive time unknown (the Lambda)
    how = {message_id: kind for table, message_id, _, kind in tables.inserts if table == "user_logins"}
    assert how == {"m0000": "copy", "m0001": "copy", "m0002": "staged", "m0003": "copy", "m0004": "staged"}


def test_a_fifo_groups_head_moved_to_the_dead_letter_queue_releases_its_group() -> None:
    """Not in the contract (the emulator adapter makes no FIFO dead-letter queue): the redrive policy
    as on the standard fake; the group's next message is delivered in the receive that moves its head."""
    queue = FakeFifoQueue(clock=FakeClock(), max_receive_count=2)
    queue.empty_wait_seconds = queue.long_poll_seconds = 0.0
    head = queue.send("a1", group="a", deduplication_id="a1")
    for count in (1, 2):
        [message] = queue.receive()
        assert (message.message_id, message.receive_count) == (head, count)
        assert queue.change_visibility([message], 0) == []
    queue.send("a2", group="a", deduplication_id="a2")
    [after] = queue.receive()  # a1 received twice: moved, and a2 delivered in the same receive
    assert (after.body, after.receive_count) == ("a2", 1)
    assert queue.dead_letters == [head]
