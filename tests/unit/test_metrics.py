"""The metrics operators look at: freshness, rejections by a bounded reason, series present from the start."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from etl.batch import Batch, prepare
from etl.metrics import ERROR_KINDS, Metrics
from etl.transform import REASON_LABELS, poison_rule, retry_quarantined, transform
from models import InvalidMessage, LoginEvent, ReceivedMessage, Rejection, WriteResult
from pii.masking import Masker
from tests.fakes import GOOD_LOGIN

MASKER = Masker(bytes(64))
NOW = 1_800_000_000.0  # the fake clock's "now", in Unix seconds


def body(**changes: object) -> str:
    return json.dumps({k: v for k, v in {**GOOD_LOGIN, **changes}.items() if v is not ...})


def kind_of(text: str) -> str:
    """The kind a body's rejection carries, from where the reason was made (LoginEvent's parsing)."""
    with pytest.raises(InvalidMessage) as info:
        LoginEvent.from_body(text)
    rejection = transform(ReceivedMessage("m", "r", text), MASKER)
    assert isinstance(rejection, Rejection) and rejection.kind == info.value.kind
    return rejection.kind


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("foo=bar", "not_json"),
        ("[1, 2]", "not_json"),
        ("[" * 100_000 + "]" * 100_000, "not_json"),
        (body(ip=...), "missing_field"),
        (body(ip=None), "missing_field"),
        (body(user_id="  "), "missing_field"),
        (body(app_version=230), "wrong_type"),
        (body(locale=7), "wrong_type"),
        (body(device_type="x" * 33), "too_long"),
        (body(ip="1" * 200), "too_long"),
        (body(user_id="a\x00b"), "not_storable"),
        (body(user_id="a\ud800b"), "not_storable"),
    ],
)
def test_every_parsing_reason_has_its_kind(text: str, kind: str) -> None:
    assert kind_of(text) == kind


def test_the_loop_s_own_reasons_have_their_kinds() -> None:
    message = ReceivedMessage("m1", "r1", body(), receive_count=3)
    poisoned = poison_rule(message, RuntimeError("boom"), MASKER, max_receives=3)
    assert poisoned is not None and poisoned.kind == "processing_failed"
    # Rows PostgreSQL refuses: a login becomes a rejection, a refused rejection a minimal one.
    good, bad = ReceivedMessage("m2", "r2", body()), ReceivedMessage("m3", "r3", "not json")
    batch = Batch([prepare([good, bad], MASKER, max_receives=5)])
    batch.quarantine_refused(
        [(batch.rows["m2"], "refused by PostgreSQL: 22001 x")], [(batch.rejections["m3"], "refused: 23514 x")], MASKER
    )
    assert {r.message_id: r.kind for r in batch.rejections.values()} == {
        "m2": "refused_by_database",
        "m3": "refused_by_database",
    }
    assert Rejection("m4", "a reason nobody classified", "", None, 1).kind == "other"
    assert set(REASON_LABELS) == {
        "body_too_large",
        "not_json",
        "missing_field",
        "wrong_type",
        "too_long",
        "not_storable",
        "processing_failed",
        "refused_by_database",
        "other",
    }


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_every_reason_and_error_series_exists_at_zero_before_any_event() -> None:
    text = scrape(Metrics())
    for reason in REASON_LABELS:
        assert f'login_etl_messages_rejected_total{{reason="{reason}"}} 0.0' in text
    for service, kinds in ERROR_KINDS.items():
        for kind in kinds:
            assert f'login_etl_errors_total{{kind="{kind}",service="{service}"}} 0.0' in text


def test_a_commit_records_freshness_per_message_the_oldest_age_and_rejections_by_kind() -> None:
    sent_ms = [int((NOW - age) * 1000) for age in (0.3, 4.0, 100.0, 2.0)]
    messages = [
        ReceivedMessage("good-1", "r1", body(), sent_timestamp_ms=sent_ms[0]),
        ReceivedMessage("good-2", "r2", body(), sent_timestamp_ms=sent_ms[1]),
        ReceivedMessage("bad-json", "r3", "{nope", sent_timestamp_ms=sent_ms[2]),
        ReceivedMessage("bad-type", "r4", body(app_version=2), sent_timestamp_ms=sent_ms[3]),
        ReceivedMessage("good-1", "r5", body(), sent_timestamp_ms=sent_ms[0], receive_count=2),  # a copy
    ]
    batch = Batch([prepare(messages, MASKER, max_receives=5)])
    metrics = Metrics(clock=lambda: NOW)
    # bad-type was already stored (a redelivery): only bad-json is a new quarantine row.
    metrics.on_commit(batch, 0.02, WriteResult(2, 1, 1, rejected_ids=frozenset({"bad-json"})))
    text = scrape(metrics)
    assert "login_etl_freshness_seconds_count 4.0" in text  # once per message id, not per copy
    assert 'login_etl_freshness_seconds_bucket{le="0.5"} 1.0' in text
    assert 'login_etl_freshness_seconds_bucket{le="5.0"} 3.0' in text
    assert 'login_etl_freshness_seconds_bucket{le="60.0"} 3.0' in text
    assert 'login_etl_freshness_seconds_bucket{le="120.0"} 4.0' in text
    assert "login_etl_oldest_message_age_seconds 100.0" in text
    assert 'login_etl_messages_rejected_total{reason="not_json"} 1.0' in text
    assert 'login_etl_messages_rejected_total{reason="wrong_type"} 0.0' in text
    assert "login_etl_messages_loaded_total 2.0" in text
    assert metrics.registry.get_sample_value("login_etl_last_commit_timestamp_seconds") == NOW
    assert "login_etl_batch_size_count 1.0" in text


def test_a_replayed_body_is_validated_as_today() -> None:
    sent = datetime(2026, 11, 20, 23, 59, tzinfo=timezone.utc)
    row = retry_quarantined("m1", MASKER.mask("rejected_body", body()), sent, MASKER)
    assert not isinstance(row, str) and row.create_date.isoformat() == "2026-11-20"
    assert MASKER.unmask(row.masked_ip) == GOOD_LOGIN["ip"]
    assert (
        retry_quarantined("m2", MASKER.mask("rejected_body", body(ip=...)), sent, MASKER)
        == "missing required field 'ip'"
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0]),  # on a bound: le is inclusive
            st.floats(min_value=0, max_value=100_000, allow_nan=False),
        ),
        max_size=400,
    ),
    st.integers(min_value=0, max_value=400),
)
def test_the_batch_histogram_exposes_what_prometheus_client_s_histogram_would(values: list[float], cut: int) -> None:
    """The shortcut (bench/shortcuts.py has what it buys) against the plain histogram: the same
    exposition for any values, observed in any two batches; a negative value (a clock behind SQS's)
    counts in the first bucket and adds nothing to the sum."""
    from prometheus_client import CollectorRegistry, Histogram

    from etl.metrics import BatchHistogram

    buckets = (0.25, 0.5, 1, 2.5, 5, 10, 30)
    reference, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("x_seconds", "d", registry=reference, buckets=buckets)
    for value in values:
        histogram.observe(value)
    batched = BatchHistogram("x_seconds", "d", buckets, ours)
    batched.observe_many(values[:cut])
    batched.observe_many(values[cut:])
    batched.observe_many([])

    def samples(registry: CollectorRegistry) -> dict[str, float]:
        return {
            s.name + str(sorted(s.labels.items())): s.value
            for metric in registry.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        }

    expected, got = samples(reference), samples(ours)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())
    batched.observe_many([-2.0])  # a clock behind SQS's: counted as 0 in the first bucket
    assert samples(ours)["x_seconds_bucket[('le', '0.25')]"] == expected["x_seconds_bucket[('le', '0.25')]"] + 1
