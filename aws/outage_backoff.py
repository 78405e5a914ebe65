"""OutageBackoff: on Lambda, the records of a batch the database refused wait longer at each receive.

An SQS event source mapping cannot hold messages through a database outage as the poller does:
each invocation that fails returns its records, each comes back after its visibility timeout, and
each receive counts towards the queue's maxReceiveCount. At a fixed visibility timeout the DLQ
would get every message after maxReceiveCount timeouts (~30 minutes with 5 and 380 s). So when
nothing of a batch could be committed (the database, not the records, is at fault), its records
are hidden for a time that grows with their receive count:

    delay(n) = min(cap, base x 2^(n - 1))          n = ApproximateReceiveCount

and a message reaches the DLQ only if all its maxReceiveCount receives met the outage, which then
lasted at least outage_bound_seconds(maxReceiveCount): the sum of the first maxReceiveCount - 1
delays (receive n + 1 comes no sooner than delay(n) after receive n). With the defaults (60 s,
900 s) and the template's MaxReceiveCount of 16, that is 3 hours. docs/lambda.md, "Database outages".

A record whose own processing raised is not delayed (the poison rule quarantines it one receive
before the DLQ, at the queue's visibility timeout). SQS's limit on a visibility timeout is 12 hours
from the receive; the cap stays far below it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import botocore.session
from botocore.exceptions import BotoCoreError

from aws.limits import MAX_VISIBILITY_TIMEOUT_SECONDS
from aws.sqs import SqsError, SqsReader
from models import ReceivedMessage

logger = logging.getLogger(__name__)

DEFAULT_BASE_SECONDS = 60
DEFAULT_CAP_SECONDS = 900
# The outage the template's default MaxReceiveCount must ride out (tests/integration/test_lambda_template.py).
REQUIRED_OUTAGE_SECONDS = 2 * 3600


def delay_seconds(receive_count: int, *, base: int = DEFAULT_BASE_SECONDS, cap: int = DEFAULT_CAP_SECONDS) -> int:
    """How long a record refused at its `receive_count`-th receive stays hidden."""
    exponent = min(max(receive_count, 1) - 1, 30)  # 2^30 x any base is past any cap
    return int(min(cap, base * 2**exponent, MAX_VISIBILITY_TIMEOUT_SECONDS))


def outage_bound_seconds(
    max_receive_count: int, *, base: int = DEFAULT_BASE_SECONDS, cap: int = DEFAULT_CAP_SECONDS
) -> int:
    """The shortest database outage that can move a valid message to the DLQ at this maxReceiveCount."""
    return sum(delay_seconds(n, base=base, cap=cap) for n in range(1, max_receive_count))


def queue_url_of(queue_arn: str, endpoint_url: str) -> str:
    """The queue URL of arn:aws:sqs:<region>:<account>:<name> at the client's endpoint."""
    parts = queue_arn.split(":")
    if len(parts) != 6 or parts[2] != "sqs":
        raise ValueError(f"not an SQS queue ARN: {queue_arn!r}")
    return f"{endpoint_url.rstrip('/')}/{parts[4]}/{parts[5]}"


class OutageBackoff:
    """Hides refused records for delay_seconds(their receive count), by ChangeMessageVisibilityBatch."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        base_seconds: int = DEFAULT_BASE_SECONDS,
        cap_seconds: int = DEFAULT_CAP_SECONDS,
        reader: Callable[[str], SqsReader] | None = None,
    ) -> None:
        if not 0 < base_seconds <= cap_seconds <= MAX_VISIBILITY_TIMEOUT_SECONDS:
            raise ValueError(f"need 0 < base_seconds <= cap_seconds <= {MAX_VISIBILITY_TIMEOUT_SECONDS}")
        self.base = base_seconds
        self.cap = cap_seconds
        self._region = region
        self._endpoint_url = endpoint_url
        self._make_reader = reader or self._reader
        self._readers: dict[str, SqsReader] = {}

    def __repr__(self) -> str:
        return f"OutageBackoff(base={self.base}s, cap={self.cap}s)"

    def delay(self, receive_count: int) -> int:
        return delay_seconds(receive_count, base=self.base, cap=self.cap)

    def hold(self, messages: Sequence[ReceivedMessage], queue_arn: str) -> int:
        """Hide each message for delay(its receive count); return how many SQS accepted. Never raises:
        a failure leaves them at the queue's visibility timeout (logged)."""
        try:
            queue_url_of(queue_arn, "")  # the ARN's shape, before any client is made
            reader = self._readers.get(queue_arn)
            if reader is None:
                reader = self._readers[queue_arn] = self._make_reader(queue_arn)
        except (ValueError, SqsError, BotoCoreError) as exc:
            logger.warning(
                "outage backoff: no queue for %s (%s); records keep the queue's visibility timeout", queue_arn, exc
            )
            return 0
        by_delay: dict[int, list[ReceivedMessage]] = {}
        for message in messages:
            by_delay.setdefault(self.delay(message.receive_count), []).append(message)
        held = 0
        for seconds, group in sorted(by_delay.items()):
            try:
                refused = reader.change_visibility(group, seconds)
            except SqsError as exc:
                logger.warning(
                    "outage backoff: %d records not delayed (%s); they keep the queue's visibility timeout",
                    len(group),
                    exc,
                    extra={"count": len(group), "service": "sqs", "error": type(exc).__name__},
                )
                continue
            held += len(group) - len(refused)
        return held

    def _reader(self, queue_arn: str) -> SqsReader:
        # The client's own endpoint (https://sqs.<region>.amazonaws.com on AWS, an emulator's when
        # AWS_ENDPOINT_URL_SQS says so) makes the queue URL: no GetQueueUrl call, no permission for it.
        endpoint = botocore.session.get_session().create_client(
            "sqs", region_name=self._region, endpoint_url=self._endpoint_url
        )
        url = queue_url_of(queue_arn, endpoint.meta.endpoint_url)
        return SqsReader(
            url, endpoint_url=self._endpoint_url, region=self._region, wait_time_seconds=0, connect_timeout_seconds=2.0
        )
