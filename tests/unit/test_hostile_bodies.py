"""Hostile bodies through parsing and masking alone (no database, no queue): each one is a valid
masked row or a rejection with a known reason, and no PII value reaches the reason.

The bodies are tests/strategies.py's, the same as the database-backed property in
tests/integration/test_hostile_input.py; here they run under the hypothesis profile (tests/conftest.py:
100 examples locally, 500 under CI=true, random in both).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings

from database.copy_format import copy_text
from etl.batch import prepare
from etl.transform import TOO_LARGE_PREFIX_BYTES, TRUNCATED_MARKER
from models import MaskedLogin, ReceivedMessage
from pii.masking import BODY_FIELD, Masker, canonical
from tests.strategies import bodies, pii_markers

MASKER = Masker(bytes(64))
SENT_MS = 1_800_000_000_000


@settings(
    deadline=None,  # a 200,000-character body takes a while to mask; the count comes from the profile
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(body=bodies)
def test_any_body_becomes_a_masked_row_or_a_clear_rejection_and_no_pii_reaches_the_reason(body: str) -> None:
    message = ReceivedMessage("m-1", "r-1", body, sent_timestamp_ms=SENT_MS)
    prepared = prepare([message], MASKER, max_receives=5)
    assert prepared.failed == [], "a body raised: it would loop until the poison rule, not be rejected"
    assert len(prepared.rows) + len(prepared.rejections) == 1
    markers = pii_markers(body)
    if prepared.rows:
        row = prepared.rows[0]
        data = json.loads(body)
        assert MASKER.unmask(row.masked_ip) == canonical("ip", data["ip"])
        assert MASKER.unmask(row.masked_device_id) == canonical("device_id", data["device_id"])
        _assert_storable(row)
        plain = (row.user_id, row.device_type, row.locale, row.app_version, row.masked_ip, row.masked_device_id)
        assert not [m for m in markers if any(m in str(value) for value in plain)]
    else:
        rejection = prepared.rejections[0]
        assert rejection.kind != "other", f"an unclassified reason: {rejection.reason[:200]!r}"
        assert not [m for m in markers if m in rejection.reason], "a PII value in the rejection reason"
        kept = MASKER.unmask(rejection.encrypted_body, (BODY_FIELD,))
        if rejection.kind == "body_too_large":  # over MAX_BODY_BYTES: a prefix, bounded
            assert kept.startswith(TRUNCATED_MARKER) and body.startswith(kept.removeprefix(TRUNCATED_MARKER))
            assert len(kept) <= len(TRUNCATED_MARKER) + TOO_LARGE_PREFIX_BYTES
        else:
            assert kept == body  # kept whole, encrypted


def _assert_storable(row: MaskedLogin) -> None:
    """The COPY text PostgreSQL is sent: UTF-8 without NULs (it refuses both), one line per row."""
    text = copy_text([row])
    assert "\x00" not in text and text.count("\n") == 1
    text.encode("utf-8")
