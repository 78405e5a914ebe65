"""The size policy and the bound on bytes in hand, over the in-memory fakes: bodies at, under and
over the limit; a flood of large bodies; receivers waiting while the bytes in hand are at the bound."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence

import pytest

from config import ConfigError, Settings, byte_count, parse_bytes
from etl.batch import BytesInHand, prepare
from etl.pipeline import Pipeline
from etl.transform import (
    DEFAULT_MAX_BODY_BYTES,
    TOO_LARGE_PREFIX_BYTES,
    TRUNCATED_MARKER,
    retry_quarantined,
    too_large,
    transform,
)
from models import MaskedLogin, ReceivedMessage, ReceiveRoom, Rejection, WriteResult
from pii.masking import BODY_FIELD
from tests.fakes import MASKER, FakeQueue, FakeSink, body, options, run_in_thread, wait_until

LIMIT = 4096
SENT_MS = 1_700_000_000_000


def padded(size: int, *, valid: bool = True, char: str = "x") -> str:
    """A body of exactly `size` UTF-8 bytes: a valid login with an unknown field `pad`, or not JSON."""
    base = body(1, pad="") if valid else "not json "
    fill = size - len(base.encode())
    width = len(char.encode())
    assert fill >= 0 and fill % width == 0
    if valid:
        return body(1, pad=char * (fill // width))
    return base + char * (fill // width)


def message(text: str, message_id: str = "m-1") -> ReceivedMessage:
    return ReceivedMessage(message_id, "r-1", text, sent_timestamp_ms=SENT_MS)


def handled(text: str, limit: int = DEFAULT_MAX_BODY_BYTES) -> MaskedLogin | Rejection:
    """What the loop makes of one body: the size policy, then parsing and masking."""
    return too_large(message(text), MASKER, limit) or transform(message(text), MASKER)


# -- the size policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT])
def test_a_valid_body_at_or_just_under_the_limit_is_loaded_without_its_unknown_fields(size: int) -> None:
    text = padded(size)
    assert len(text.encode()) == size
    result = handled(text, LIMIT)
    assert isinstance(result, MaskedLogin)
    assert result.user_id == "user-1"  # the row has the event's columns only: `pad` is not stored


def test_a_body_one_byte_over_the_limit_is_quarantined_unparsed_with_length_and_sha256() -> None:
    text = padded(LIMIT + 1)  # a valid event: the size rule applies all the same
    result = handled(text, LIMIT)
    assert isinstance(result, Rejection)
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert result.reason.startswith(f"body too large: {LIMIT + 1} bytes, limit {LIMIT}; sha256 {digest}")
    assert result.kind == "body_too_large"
    assert "user-1" not in result.reason and "10.0.0.1" not in result.reason  # no value of the body
    kept = MASKER.unmask(result.encrypted_body, (BODY_FIELD,))
    assert kept == TRUNCATED_MARKER + text[:TOO_LARGE_PREFIX_BYTES]
    assert result.sent_at is not None and result.receive_count == 1


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    text = padded(LIMIT + 3, valid=False, char="é")  # fewer characters than LIMIT, more bytes
    assert len(text) < LIMIT < len(text.encode())
    result = handled(text, LIMIT)
    assert isinstance(result, Rejection) and result.reason.startswith(f"body too large: {LIMIT + 3} bytes")
    kept = MASKER.unmask(result.encrypted_body, (BODY_FIELD,))
    assert len(kept.removeprefix(TRUNCATED_MARKER).encode()) <= TOO_LARGE_PREFIX_BYTES


def test_what_is_stored_of_a_1_mib_body_is_bounded() -> None:
    text = "\x00not json" + "y" * (1_048_576 - 9)
    result = handled(text)  # the default limit
    assert isinstance(result, Rejection)
    assert len(result.encrypted_body) < 2 * TOO_LARGE_PREFIX_BYTES
    assert f"{1_048_576} bytes, limit {DEFAULT_MAX_BODY_BYTES}" in result.reason


def test_a_kept_prefix_is_never_replayed_even_when_it_parses() -> None:
    # A valid event padded with whitespace: its prefix alone is a complete JSON object.
    text = body(1) + " " * (LIMIT * 2)
    rejection = handled(text, LIMIT)
    assert isinstance(rejection, Rejection)
    again = retry_quarantined("m-1", rejection.encrypted_body, rejection.sent_at, MASKER)
    assert isinstance(again, str) and again.startswith("body too large")


def test_prepare_lets_a_too_large_body_go_and_counts_what_it_keeps() -> None:
    big = message("z" * 200_000, "big")
    small = message(body(2), "small")
    prepared = prepare([big, small], MASKER, max_receives=5, max_body_bytes=LIMIT)
    assert [r.message_id for r in prepared.rejections] == ["big"] and len(prepared.rows) == 1
    assert big.body == ""  # not held until the commit
    assert prepared.nbytes == len(small.body) + len(prepared.rejections[0].encrypted_body)
    assert prepared.nbytes < 10_000


def test_the_settings_read_the_byte_limits_with_units() -> None:
    assert parse_bytes("65536") == 65536 and parse_bytes("64KiB") == 65536 and parse_bytes("48 mib") == 48 << 20
    env = {"MASKING_KEY": "A" * 86 + "==", "MAX_BODY_BYTES": "32KiB", "MAX_BYTES_IN_HAND": "20MiB"}
    settings = Settings.from_env(env)
    assert (settings.max_body_bytes, settings.max_bytes_in_hand) == (32768, 20 << 20)
    with pytest.raises(ConfigError, match="MAX_BYTES_IN_HAND must be at least 10485760"):
        byte_count("MAX_BYTES_IN_HAND", "9MiB", 1, 10 << 20)
    with pytest.raises(ConfigError, match="not a byte count"):
        byte_count("MAX_BODY_BYTES", "64KB", 1, 1)


# -- bytes in hand -------------------------------------------------------------------------------


def test_a_receive_waits_for_room_and_a_release_lets_it_go() -> None:
    in_hand = BytesInHand(limit=100, per_receive=40)
    first, second = in_hand.claim(lambda: False), in_hand.claim(lambda: False)
    assert first.take(None) and second.take(None)  # None: the worst case, 40 each
    assert in_hand.held == 80
    got: list[bool] = []
    third = in_hand.claim(lambda: False)
    waiter = threading.Thread(target=lambda: got.append(third.take(None)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and in_hand.held == 80  # 80 + 40 > 100: it waits
    first.settle(5)  # the first receive held only 5 bytes
    waiter.join(2)
    assert got == [True] and in_hand.held == 85
    assert BytesInHand(limit=10, per_receive=50).claim(lambda: False).take(None)  # one receive always fits
    full = BytesInHand(limit=10, per_receive=10)
    full.claim(lambda: False).take(None)
    assert full.claim(lambda: True).take(None) is False  # stopping: gives up instead of waiting


def test_a_share_of_its_response_size_waits_only_when_that_size_does_not_fit() -> None:
    in_hand = BytesInHand(limit=100, per_receive=100)  # the worst case is the whole bound
    big = in_hand.claim(lambda: False)
    assert big.take(70) and in_hand.held == 70
    small = in_hand.claim(lambda: False)
    assert small.take(30) and in_hand.held == 100  # fits exactly: no wait for a worst case of 100
    assert small.take(20) and in_hand.held == 90  # taken again (a retried receive): replaced, not added
    late = in_hand.claim(lambda: False)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(late.take(15)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and in_hand.held == 90  # 90 + 15 > 100: it waits
    big.settle(0)
    waiter.join(2)
    assert got == [True] and in_hand.held == 35
    assert not in_hand.claim(lambda: True).take(100)  # stopping: nothing taken
    assert in_hand.held == 35
    alone = BytesInHand(limit=100, per_receive=100).claim(lambda: False)
    assert alone.take(250)  # larger than the bound, with nothing else held: it goes


def test_a_share_taken_again_and_refused_on_stopping_is_empty_and_settles_to_nothing() -> None:
    """GIVEN a receive whose share was taken, then taken again (a retried receive) while stopping
    with no room for the new size
    WHEN the receiver settles it to nothing (its `finally`: no messages)
    THEN the share holds nothing and the bytes in hand are the other receives' only."""
    in_hand = BytesInHand(limit=100, per_receive=100)
    assert in_hand.claim(lambda: False).take(90)
    stopping = threading.Event()
    retried = in_hand.claim(stopping.is_set)
    assert retried.take(10) and in_hand.held == 100
    stopping.set()
    assert not retried.take(50)  # its 10 given back; 90 + 50 > 100 and stopping: nothing taken
    assert retried.held == 0 and in_hand.held == 90
    retried.settle(0)
    assert retried.held == 0 and in_hand.held == 90


def test_the_gate_before_a_sized_receive_waits_while_the_bytes_in_hand_are_at_the_bound() -> None:
    in_hand = BytesInHand(limit=100, per_receive=50)
    held = in_hand.claim(lambda: False)
    held.take(100)
    assert in_hand.wait_for_room(lambda: True) is False  # at the bound and stopping
    opened: list[bool] = []
    waiter = threading.Thread(target=lambda: opened.append(in_hand.wait_for_room(lambda: False)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    held.settle(99)
    waiter.join(2)
    assert opened == [True]


class SizedSource:
    """Small messages from a queue whose MaximumMessageSize is 1 MiB; each receive takes its
    response's size first (a models.SizedMessageSource) and lasts a while, like a long poll's round
    trip; records how many receives were in flight at once."""

    def __init__(self, count: int) -> None:
        self._bodies = [(f"m{n:04d}", body(n)) for n in range(count)]
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.deleted = 0

    def _next(self) -> list[ReceivedMessage]:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        threading.Event().wait(0.05)
        with self._lock:
            self.in_flight -= 1
            taken, self._bodies = self._bodies[:10], self._bodies[10:]
        return [ReceivedMessage(message_id, f"r-{message_id}", text, SENT_MS) for message_id, text in taken]

    def receive(self) -> list[ReceivedMessage]:
        return self._next()

    def receive_within(self, room: ReceiveRoom) -> list[ReceivedMessage]:
        got = self._next()
        return got if room.take(sum(len(m.body) + 500 for m in got)) else []

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        with self._lock:
            self.deleted += len(messages)
        return []

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        return []


def test_receives_of_small_messages_do_not_wait_for_room_sized_for_the_largest() -> None:
    # GIVEN a queue of 1 MiB MaximumMessageSize (AWS's default since 2025-08) and the default bound:
    # room for three receives of ten 1 MiB messages, but the messages are a few hundred bytes
    source = SizedSource(400)
    sink = FakeSink()
    opts = options(receivers=8, max_bytes_in_hand=32 * 1_048_576, max_message_bytes=1_048_576)
    # WHEN the loop drains it
    stats = Pipeline(source, sink, MASKER, opts).run()
    # THEN every receiver had its receive in flight at once (not three, as a worst case each would allow)
    assert source.most_in_flight == 8
    assert stats.loaded == 400 and len(sink.logins) == 400 and source.deleted == 400


class GatedSink(FakeSink):
    """A FakeSink whose writes wait for `gate`; records each batch's message count."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.batches: list[int] = []

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        self.gate.wait()
        self.batches.append(len(logins) + len(rejections))
        return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)


class WatchedQueue(FakeQueue):
    """A FakeQueue that records the pipeline's bytes in hand each time a receive returns."""

    pipeline: Pipeline | None = None
    peaks: list[int]

    def receive(self, consumer: str = "") -> list[ReceivedMessage]:
        received = super().receive(consumer)
        if self.pipeline is not None:
            self.peaks.append(self.pipeline.in_hand.held)
        return received


def flood(count: int) -> list[tuple[str, str]]:
    """Large bodies (some over the limit, some under it and invalid, some valid) among ordinary ones."""
    items = []
    for n in range(count):
        if n % 4 == 0:
            text = json.dumps({"pad": "o" * 300_000})  # over the limit
        elif n % 4 == 1:
            text = "bad " + "u" * 60_000  # under the limit, not JSON: stored whole, encrypted
        elif n % 4 == 2:
            text = body(n, pad="v" * 50_000)  # valid, under the limit: loaded
        else:
            text = body(n)
        items.append((f"m{n:05d}", text))
    return items


def test_receivers_wait_while_the_bytes_in_hand_are_at_the_bound() -> None:
    # GIVEN a bound of four receives of 256 KiB messages, and a writer that cannot commit yet
    sink = GatedSink()
    queue = WatchedQueue(flood(400), stored=sink.holds)
    queue.peaks = []
    # (batches of up to 1,000: the inbox's count bound, 200 receives, is not the one that binds)
    opts = options(receivers=4, batch_size=1000, max_bytes_in_hand=4 * 10 * 262_144, max_message_bytes=262_144)
    pipeline = Pipeline(queue, sink, MASKER, opts)
    queue.pipeline = pipeline
    thread, outcome = run_in_thread(pipeline)
    # WHEN the receivers have filled what the bound allows
    in_hand = pipeline.in_hand

    def stalled_at_the_bound() -> bool:
        # Stable, not a moment: a receive in flight settles below its reservation and lets another start.
        before = len(queue.peaks)
        threading.Event().wait(0.3)
        return len(queue.peaks) == before and in_hand.held + in_hand.per_receive > in_hand.limit

    wait_until(stalled_at_the_bound, timeout=30)
    stalled = len(queue.peaks)
    threading.Event().wait(0.5)
    # THEN they wait: no receive while the writer holds the bytes, far fewer than 400 received
    assert len(queue.peaks) == stalled < 40
    assert pipeline.in_hand.held <= opts.max_bytes_in_hand
    sink.gate.set()
    thread.join(30)
    assert not thread.is_alive() and not isinstance(outcome[0], Exception)
    # and once the writer commits, everything is stored once and deleted; the bound always held
    assert len(sink.logins) + len(sink.rejections) == 400 and queue.left == 0 and sink.stored_twice == []
    assert max(queue.peaks) <= opts.max_bytes_in_hand
    assert pipeline.in_hand.held == 0


def test_a_batch_is_cut_at_half_the_bytes_in_hand() -> None:
    sink = GatedSink()
    sink.gate.set()
    queue = FakeQueue([(f"m{n:04d}", body(n, pad="w" * 60_000)) for n in range(200)], stored=sink.holds)
    opts = options(
        receivers=2, batch_size=1000, flush_seconds=3600.0, max_bytes_in_hand=2_000_000, max_message_bytes=65_536
    )
    Pipeline(queue, sink, MASKER, opts).run()
    assert len(sink.logins) == 200 and queue.left == 0
    # ~60 KB a message: half the bound is ~16 messages, plus at most one receive of 10
    assert max(sink.batches) <= 1_000_000 // 60_000 + 10 + 1


def test_a_bound_of_one_receive_cuts_every_receive_into_its_own_batch() -> None:
    # GIVEN room for one receive only, and batches that would otherwise wait an hour for their age
    sink = GatedSink()
    sink.gate.set()
    queue = FakeQueue([(f"m{n:04d}", body(n, pad="w" * 20_000)) for n in range(50)], stored=sink.holds)
    opts = options(receivers=3, batch_size=1000, flush_seconds=3600.0, max_bytes_in_hand=655_360)
    pipeline = Pipeline(queue, sink, MASKER, opts)
    assert pipeline.in_hand.batch_bytes == 1
    # WHEN it drains; THEN no receive waits for room held by a batch waiting for its age
    thread, outcome = run_in_thread(pipeline)
    thread.join(30)
    assert not thread.is_alive() and not isinstance(outcome[0], Exception)
    assert len(sink.logins) == 50 and queue.left == 0 and max(sink.batches) <= 10


def test_stored_bodies_are_let_go_at_the_commit() -> None:
    sink = FakeSink()
    queue = FakeQueue([(f"m{n}", body(n)) for n in range(30)], stored=sink.holds)
    kept: list[ReceivedMessage] = []
    original = queue.receive

    def receive(consumer: str = "") -> list[ReceivedMessage]:
        got = original(consumer)
        kept.extend(got)
        return got

    queue.receive = receive  # type: ignore[method-assign]
    Pipeline(queue, sink, MASKER, options()).run()
    assert len(kept) == 30 and all(m.body == "" for m in kept)
