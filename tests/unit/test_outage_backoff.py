"""The Lambda's outage backoff (aws/outage_backoff.py): the delays, the bound they give, the queue URL,
what `hold` asks of SQS. Against SQS and PostgreSQL: tests/integration/test_lambda_handler.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from aws.outage_backoff import (
    REQUIRED_OUTAGE_SECONDS,
    OutageBackoff,
    delay_seconds,
    outage_bound_seconds,
    queue_url_of,
)
from aws.sqs import SqsUnavailable
from lambda_handler import DEFAULT_MAX_RECEIVE_COUNT
from models import ReceivedMessage


def test_the_delay_doubles_from_the_base_at_each_receive_up_to_the_cap() -> None:
    assert [delay_seconds(n, base=60, cap=900) for n in range(1, 8)] == [60, 120, 240, 480, 900, 900, 900]
    assert delay_seconds(0) == delay_seconds(1)  # a record without a receive count: a first delivery
    assert delay_seconds(10_000) == 900  # no overflow at absurd counts


def test_the_bound_is_the_sum_of_the_delays_before_the_last_receive() -> None:
    # receive n + 1 comes no sooner than delay(n) after receive n: receive 4 after 1 + 2 + 4 s
    assert outage_bound_seconds(4, base=1, cap=4) == 7
    assert outage_bound_seconds(1, base=60, cap=900) == 0  # dead-lettered at the second receive


def test_the_handler_s_default_max_receive_count_rides_out_two_hours() -> None:
    assert outage_bound_seconds(DEFAULT_MAX_RECEIVE_COUNT) >= REQUIRED_OUTAGE_SECONDS
    assert outage_bound_seconds(DEFAULT_MAX_RECEIVE_COUNT) == 3 * 3600  # what docs/lambda.md says


def test_the_queue_url_is_made_from_the_arn_at_the_client_s_endpoint() -> None:
    arn = "arn:aws:sqs:eu-west-1:123456789012:login-queue"
    assert (
        queue_url_of(arn, "https://sqs.eu-west-1.amazonaws.com")
        == "https://sqs.eu-west-1.amazonaws.com/123456789012/login-queue"
    )
    assert queue_url_of(arn, "http://localhost:4566/") == "http://localhost:4566/123456789012/login-queue"
    with pytest.raises(ValueError, match="not an SQS queue ARN"):
        queue_url_of("arn:aws:sns:eu-west-1:123456789012:topic", "http://x")


class FakeReader:
    """SqsReader.change_visibility as SQS answers it: the receipt handles refused; or it raises."""

    def __init__(self, *, refuse: Sequence[str] = (), fail: bool = False) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self._refuse, self._fail = set(refuse), fail

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        if self._fail:
            raise SqsUnavailable("ChangeMessageVisibilityBatch failed: timeout")
        self.calls.append(([m.message_id for m in messages], timeout_seconds))
        return [m.receipt_handle for m in messages if m.message_id in self._refuse]


def message(message_id: str, receive_count: int) -> ReceivedMessage:
    return ReceivedMessage(
        message_id=message_id, receipt_handle=f"rh-{message_id}", body="{}", receive_count=receive_count
    )


def test_hold_hides_each_record_for_the_delay_of_its_own_receive_count() -> None:
    reader = FakeReader(refuse=["c"])
    backoff = OutageBackoff(region="us-east-1", base_seconds=60, cap_seconds=900, reader=lambda arn: reader)  # type: ignore[arg-type,return-value]
    held = backoff.hold([message("a", 1), message("b", 3), message("c", 1), message("d", 9)], "arn:aws:sqs:r:1:q")
    assert reader.calls == [(["a", "c"], 60), (["b"], 240), (["d"], 900)]
    assert held == 3  # c's receipt handle was refused (stale)


def test_hold_never_raises_when_sqs_fails() -> None:
    reader = FakeReader(fail=True)
    backoff = OutageBackoff(region="us-east-1", reader=lambda arn: reader)  # type: ignore[arg-type,return-value]
    assert backoff.hold([message("a", 1)], "arn:aws:sqs:r:1:q") == 0
    assert OutageBackoff(region="us-east-1").hold([message("a", 1)], "not-an-arn") == 0


@pytest.mark.parametrize(("base", "cap"), [(0, 10), (20, 10), (1, 50_000)])
def test_backoff_bounds_are_checked_at_construction(base: int, cap: int) -> None:
    with pytest.raises(ValueError, match="base_seconds"):
        OutageBackoff(region="us-east-1", base_seconds=base, cap_seconds=cap)
