"""The quarantine paths of transform.py, their details each found untested by mutation testing
(docs/mutation.md): the log lines' documented fields (docs/operations.md: `message_id`, `reason`,
`error`), the refused-row fallbacks, the bound of RecentQuarantine, and what a too-large body keeps."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone

import pytest

from etl import transform as transform_module
from etl.batch import Batch, Prepared, RecentQuarantine, prepare
from etl.transform import (
    TOO_LARGE_PREFIX_BYTES,
    TRUNCATED_MARKER,
    poison_rule,
    reject,
    reject_too_large,
    retry_quarantined,
    transform,
)
from models import MaskedLogin, ReceivedMessage, Rejection
from pii.masking import BODY_FIELD, Masker, MaskingError
from tests.fakes import GOOD_LOGIN

MASKER = Masker(bytes(64))


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name in ("etl.transform", "etl.batch") and r.levelno == level]


def test_a_message_left_for_redelivery_by_the_poison_rule_is_logged_with_its_id_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = ReceivedMessage("m-7", "r", "{}", receive_count=2)
    with caplog.at_level(logging.ERROR, logger="etl"):
        assert poison_rule(message, ValueError("x"), MASKER, max_receives=5) is None
    (record,) = records(caplog, logging.ERROR)
    assert (record.message_id, record.error) == ("m-7", "ValueError")  # type: ignore[attr-defined]
    text = record.getMessage()
    assert "m-7" in text and "ValueError" in text and "2 of 5" in text


def test_a_message_quarantined_by_the_poison_rule_is_logged_with_its_id_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = ReceivedMessage("m-8", "r", "{}", receive_count=5)
    with caplog.at_level(logging.ERROR, logger="etl"):
        rejection = poison_rule(message, ValueError("x"), MASKER, max_receives=5)
    assert rejection is not None and rejection.reason == "processing failed 5 times: ValueError"
    (record,) = records(caplog, logging.ERROR)
    assert (record.message_id, record.reason) == ("m-8", rejection.reason)  # type: ignore[attr-defined]
    assert "m-8" in record.getMessage() and rejection.reason in record.getMessage()


def batch_of(*messages: ReceivedMessage) -> Batch:
    part = Prepared(list(messages))
    for message in messages:
        result = transform(message, MASKER)
        (part.rejections if isinstance(result, Rejection) else part.rows).append(result)  # type: ignore[arg-type]
    return Batch([part])


def login(message_id: str) -> ReceivedMessage:
    return ReceivedMessage(message_id, f"r-{message_id}", json.dumps(GOOD_LOGIN), sent_timestamp_ms=1_700_000_000_000)


def test_a_login_postgresql_refuses_becomes_its_rejection_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    batch = batch_of(login("id-a"), login("id-b"))
    with caplog.at_level(logging.WARNING, logger="etl"):
        batch.quarantine_refused([(batch.rows["id-a"], "refused by PostgreSQL: value too long")], [], MASKER)
    assert list(batch.rows) == ["id-b"]
    assert batch.rejections["id-a"].reason == "refused by PostgreSQL: value too long"
    (record,) = records(caplog, logging.WARNING)
    assert (record.message_id, record.reason) == ("id-a", "refused by PostgreSQL: value too long")  # type: ignore[attr-defined]
    assert "id-a" in record.getMessage() and "value too long" in record.getMessage()


def test_a_refused_quarantine_row_is_replaced_by_a_minimal_one_then_left_for_redelivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The minimal row keeps the encrypted body and the receive count (which the writer's
    one-table lock reads) and drops what may have been refused (the reason, the sent time);
    refused again, the message is left to come back."""
    bad = [
        ReceivedMessage(f"bad-{n}", f"r{n}", "not json", sent_timestamp_ms=1_700_000_000_000, receive_count=3)
        for n in range(2)
    ]
    batch = batch_of(*bad)
    original = {m.message_id: batch.rejections[m.message_id] for m in bad}
    with caplog.at_level(logging.WARNING, logger="etl"):
        batch.quarantine_refused([], [(batch.rejections[m.message_id], "NUL") for m in bad], MASKER)
    for m in bad:
        minimal = batch.rejections[m.message_id]
        assert minimal == Rejection(
            message_id=m.message_id,
            reason="quarantine row NUL; original reason dropped",
            encrypted_body=original[m.message_id].encrypted_body,
            sent_at=None,
            receive_count=3,
            kind="refused_by_database",
        )
    warnings = records(caplog, logging.WARNING)
    assert [(r.message_id, r.reason) for r in warnings] == [("bad-0", "NUL"), ("bad-1", "NUL")]  # type: ignore[attr-defined]
    assert all(r.message_id in r.getMessage() and "(NUL)" in r.getMessage() for r in warnings)  # type: ignore[attr-defined]

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="etl"):
        batch.quarantine_refused([], [(batch.rejections[m.message_id], "still") for m in bad], MASKER)
    assert batch.rejections == {} and [m.message_id for m in batch.failed] == ["bad-0", "bad-1"]
    assert batch.deletable() == []
    errors = records(caplog, logging.ERROR)
    assert [(r.message_id, r.reason) for r in errors] == [("bad-0", "still"), ("bad-1", "still")]  # type: ignore[attr-defined]
    assert all(r.message_id in r.getMessage() and "(still)" in r.getMessage() for r in errors)  # type: ignore[attr-defined]


def test_recent_quarantine_holds_the_latest_ids_up_to_its_size() -> None:
    recent = RecentQuarantine(size=3)
    recent.remember(["a", "b", "c"])
    assert all(recent.holds_any([x]) for x in "abc")
    recent.remember(["d"])  # the oldest goes
    assert not recent.holds_any(["a"])
    assert all(recent.holds_any([x]) for x in "bcd")


def test_a_too_large_body_with_a_lone_surrogate_still_gets_its_length_and_digest() -> None:
    """A body is text from SQS's JSON; an escaped lone surrogate is text Python can hold but UTF-8
    cannot encode strictly. The size policy must still quarantine it rather than raise."""
    body = "\ud800" + "x" * 100
    rejection = reject_too_large(ReceivedMessage("m", "r", body), MASKER, size=103, limit=10)
    digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
    assert f"sha256 {digest}" in rejection.reason


def test_a_too_large_body_of_four_byte_characters_keeps_its_first_prefix_bytes() -> None:
    body = "😀" * 5000  # 4 bytes each
    rejection = reject_too_large(ReceivedMessage("m", "r", body), MASKER, size=20_000, limit=10)
    assert rejection.reason.endswith(f"first {TOO_LARGE_PREFIX_BYTES} bytes kept")
    kept = MASKER.unmask(rejection.encrypted_body, (BODY_FIELD,))
    assert kept == TRUNCATED_MARKER + "😀" * (TOO_LARGE_PREFIX_BYTES // 4)


def test_a_quarantined_message_without_a_sent_time_replays_to_a_row_under_its_own_id() -> None:
    rejection = reject(
        ReceivedMessage("q-1", "r", json.dumps(GOOD_LOGIN)), MASKER, "refused by PostgreSQL", "refused_by_database"
    )
    row = retry_quarantined("q-1", rejection.encrypted_body, None, MASKER)
    assert not isinstance(row, str) and row.message_id == "q-1"
    sent = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    row = retry_quarantined("q-1", rejection.encrypted_body, sent, MASKER)
    assert not isinstance(row, str) and row.create_date == sent.date()


def test_a_replay_opens_only_a_body_token_not_a_token_of_another_field() -> None:
    """Tokens carry their field name as associated data (docs/keys-and-privacy.md): what is in the
    quarantine's body column is opened as a body, and a token of another field is refused."""
    with pytest.raises(MaskingError):
        retry_quarantined("q-2", MASKER.mask("device_id", json.dumps(GOOD_LOGIN)), None, MASKER)


def test_a_replay_whose_processing_raises_says_which_error_and_nothing_of_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(message: ReceivedMessage, masker: Masker) -> MaskedLogin | Rejection:
        raise KeyError(message.body)

    monkeypatch.setattr(transform_module, "transform", boom)
    rejection = reject(
        ReceivedMessage("q-3", "r", json.dumps(GOOD_LOGIN)), MASKER, "refused by PostgreSQL", "refused_by_database"
    )
    reason = retry_quarantined("q-3", rejection.encrypted_body, None, MASKER)
    assert reason == "processing failed on replay: KeyError"


def test_a_row_keeps_the_events_locale_and_the_network_token_of_its_ip() -> None:
    row = transform(login("m-9"), MASKER)
    assert isinstance(row, MaskedLogin)
    assert row.locale == GOOD_LOGIN["locale"]
    assert row.masked_network is not None
    assert row.masked_network == MASKER.mask_ip(str(GOOD_LOGIN["ip"]))[1]


def test_prepare_logs_each_rejection_with_its_id_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="etl"):
        prepared = prepare([ReceivedMessage("id-bad", "r", "not json")], MASKER, max_receives=5)
    (rejection,) = prepared.rejections
    (record,) = records(caplog, logging.WARNING)
    assert (record.message_id, record.reason) == ("id-bad", rejection.reason)  # type: ignore[attr-defined]
    assert "id-bad" in record.getMessage() and rejection.reason in record.getMessage()
