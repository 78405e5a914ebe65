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
from models import MaskedLogin, ReceivedMessage, Rejection, WriteResult
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
    assert in_hand.reserve(lambda: False) and in_hand.reserve(lambda: False)
    assert in_hand.held == 80
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(in_hand.reserve(lambda: False)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and in_hand.held == 80  # 80 + 40 > 100: it waits
    in_hand.settle(5)  # the first receive held only 5 bytes
    waiter.join(2)
    assert got == [True] and in_hand.held == 85
    assert BytesInHand(limit=10, per_receive=50).reserve(lambda: False)  # one receive always fits
    full = BytesInHand(limit=10, per_receive=10)
    full.reserve(lambda: False)
    assert full.reserve(lambda: True) is False  # stopping: gives up instead of waiting


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
