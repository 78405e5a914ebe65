"""AWS Lambda entry point: an SQS event source mapping's batch through the poller's own core.

    handler(event, context) -> {"batchItemFailures": [{"itemIdentifier": messageId}, ...]}

Each invocation: the event's records are parsed and masked by transform.prepare (the size policy,
MAX_BODY_BYTES, and the poison rule included) and written by batches.store through PostgresWriter in
ONE transaction (COPY, idempotent on messageId, rejections to user_logins_rejected): the very code
`python main.py` runs. The response lists only the records SQS must deliver again (the mapping's
ReportBatchItemFailures):

- a record whose processing raised, until it has been received DLQ_MAX_RECEIVE_COUNT - 1 times
  (then the poison rule quarantines it instead, before SQS would dead-letter it);
- every record when the write failed: PostgreSQL unreachable, nothing committed. Those records are
  then hidden for a time growing with their receive count (aws/outage_backoff.py), so that an
  outage of up to outage_bound_seconds(maxReceiveCount) (3 h with the template's defaults) sends
  no valid message to the DLQ.

A malformed body is quarantined and is not a failure: reported, it would only loop into the DLQ.
Lambda deletes every record not listed once the function returns; a duplicate delivery is stored
once (the unique messageId per day).

Per execution environment, at the first invocation (a cold start): the Settings, the keyring (a
KMS-wrapped key is decrypted once; its plaintext stays in memory) and one PostgreSQL connection,
reused by every later invocation and opened again when it broke meanwhile. Every wait on PostgreSQL
ends inside the invocation: a connect within a third of the time left (at most 5 s), a statement
within a quarter of the time left at connect (statement_timeout), a call over a connection the
network silently dropped within ~8 s (TCP keepalives and tcp_user_timeout). A cold start that fails
(configuration, KMS, Secrets Manager) raises: the whole batch comes back after the visibility
timeout, and the next invocation tries the cold start again.

This module is wiring, like main.py: it alone reads os.environ (the variables: docs/lambda.md).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from aws.lambda_event import batch_response, messages_of, source_arn
from aws.outage_backoff import OutageBackoff
from aws.secrets import read_secret
from config import DEFAULT_REGION, Settings, database_url_with_secret
from database.errors import DatabaseError, DatabaseUnavailable
from database.sqs_postgres import PostgresWriter
from etl.batch import Batch, RecentQuarantine, prepare
from etl.commit import store, write_batch
from etl.observability import JsonFormatter
from etl.transform import DEFAULT_MAX_BODY_BYTES
from models import WriteResult
from pii.masking import Masker

logger = logging.getLogger("login_etl.lambda")

# Each execution environment holds one PostgreSQL connection, kept between invocations: the
# function's reserved concurrency (environments running at once) is the number of connections it
# may hold, the database role's CONNECTION LIMIT (deploy/lambda/template.yaml, docs/lambda.md).
CONNECTIONS_PER_INVOCATION = 1
# The queue's RedrivePolicy maxReceiveCount, unless DLQ_MAX_RECEIVE_COUNT says otherwise: with the
# outage backoff's defaults, 16 receives ride out a database outage of 3 hours (docs/lambda.md).
DEFAULT_MAX_RECEIVE_COUNT = 16
# The connect timeout: at most this, at least libpq's floor (it treats 1 as 2), and at most a third
# of the time the invocation has left, so that a refused batch is still reported in time.
MAX_CONNECT_TIMEOUT_SECONDS = 5
MIN_CONNECT_TIMEOUT_SECONDS = 2
# PostgreSQL's statement_timeout for the connection: a quarter of the time the invocation had left
# when it connected (at least 1 s), so that a statement waiting on a lock is cancelled and the batch
# reported for retry before the function times out, even after one reconnect and a second attempt.
# The network side is bounded by the TCP settings every connection gets (database/sqs_postgres.py).
STATEMENT_TIMEOUT_SHARE = 0.25
MIN_STATEMENT_TIMEOUT_SECONDS = 1.0


class SqsBatchHandler:
    """Handles the events of one execution environment: one keyring, one PostgreSQL connection."""

    def __init__(
        self,
        writer: PostgresWriter,
        masker: Masker,
        *,
        max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
        max_connect_timeout_seconds: int = MAX_CONNECT_TIMEOUT_SECONDS,
        outage_backoff: OutageBackoff | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if max_receive_count < 1:
            raise ValueError(f"max_receive_count must be at least 1, got {max_receive_count}")
        self.writer = writer
        self._masker = masker
        # Quarantined one receive before SQS would dead-letter it (as main.py does with the RedrivePolicy).
        self._max_receives = max(1, max_receive_count - 1)
        self._max_connect_timeout = max(MIN_CONNECT_TIMEOUT_SECONDS, max_connect_timeout_seconds)
        self._max_body_bytes = max_body_bytes  # bodies over it: quarantined unparsed, as by the poller
        self._quarantined = RecentQuarantine()
        self._backoff = outage_backoff

    def __repr__(self) -> str:
        return (
            f"SqsBatchHandler(max_receives={self._max_receives}, max_body_bytes={self._max_body_bytes}, "
            f"{self._backoff!r})"
        )

    def handle(self, event: Mapping[str, Any], context: Any = None) -> dict[str, list[dict[str, str]]]:
        """One invocation: store what can be stored in one transaction; return the records to retry."""
        started = time.monotonic()
        messages = messages_of(event)
        batch = Batch([prepare(messages, self._masker, self._max_receives, self._max_body_bytes)])
        try:
            written = store(batch, self._masker, lambda: self._write(batch, context))
        except DatabaseError as exc:
            # The database's fault, not the records': they wait longer at each receive (an outage
            # must not use up their receives), unlike a record whose own processing raised.
            arn = source_arn(event)
            held = self._backoff.hold(messages, arn) if self._backoff is not None and arn else 0
            logger.error(
                "PostgreSQL: %s; nothing committed, all %d records reported for retry, %d delayed",
                exc,
                len(messages),
                held,
                extra={"count": len(messages), "service": "postgres", "error": type(exc).__name__},
            )
            return batch_response(m.message_id for m in messages)
        self._quarantined.remember(batch.rejections)  # all of them: see batches.Committer.commit
        failed = [m.message_id for m in batch.failed]
        milliseconds = round((time.monotonic() - started) * 1000, 1)
        logger.info(
            "%d records: loaded %d, quarantined %d, duplicates %d, reported for retry %d in %.0f ms",
            len(messages),
            written.inserted,
            written.rejected,
            written.duplicates,
            len(failed),
            milliseconds,
            extra={"batch_size": len(messages), "count": len(failed), "duration_ms": milliseconds},
        )
        return batch_response(failed)

    def _write(self, batch: Batch, context: Any) -> WriteResult:
        reused = self.writer.connected
        if not reused:
            self._connect(context)
        try:
            return write_batch(self.writer, batch, self._quarantined)
        except DatabaseUnavailable as exc:
            if not reused:
                raise
            # The connection kept from an earlier invocation died while the environment was frozen
            # (a server restart, a failover, an idle timeout): nothing was committed; open a new one, once.
            logger.warning(
                "the kept PostgreSQL connection broke (%s); connecting again",
                exc,
                extra={"service": "postgres", "error": type(exc).__name__},
            )
            self._connect(context)
            return write_batch(self.writer, batch, self._quarantined)

    def _connect(self, context: Any) -> None:
        self.writer.connect(
            timeout_seconds=self.connect_timeout(context), statement_timeout_seconds=self.statement_timeout(context)
        )

    def connect_timeout(self, context: Any) -> int:
        """Seconds a connect may take: a third of the time left (context.get_remaining_time_in_millis)."""
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is None:
            return self._max_connect_timeout
        third = int(remaining() / 1000 / 3)
        return max(MIN_CONNECT_TIMEOUT_SECONDS, min(self._max_connect_timeout, third))

    def statement_timeout(self, context: Any) -> float | None:
        """Seconds one statement of the connection may run: a quarter of the time left; None without a context."""
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is None:
            return None
        return max(MIN_STATEMENT_TIMEOUT_SECONDS, remaining() / 1000 * STATEMENT_TIMEOUT_SHARE)


def cold_start(env: Mapping[str, str]) -> SqsBatchHandler:
    """Everything an execution environment keeps: settings, keyring, the PostgreSQL writer (not yet connected).

    DATABASE_SECRET_ARN, when set, supplies the DSN (or its user and password) from Secrets Manager.
    Raises ConfigError, SecretError, MaskingError or KmsUnavailable.
    """
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    secret_arn = env.get("DATABASE_SECRET_ARN", "").strip()
    if secret_arn:
        dsn = database_url_with_secret(env.get("DATABASE_URL") or None, read_secret(secret_arn, region=region))
        env = {**env, "DATABASE_URL": dsn}
    settings = Settings.from_env(env)
    masker = settings.load_masker()
    max_receive_count = env.get("DLQ_MAX_RECEIVE_COUNT", "").strip()
    handler = SqsBatchHandler(
        PostgresWriter(settings.database_url, application_name="login-etl-lambda", key_checks=masker.check_values),
        masker,
        max_receive_count=int(max_receive_count) if max_receive_count.isdigit() else DEFAULT_MAX_RECEIVE_COUNT,
        outage_backoff=OutageBackoff(region=region),
        max_body_bytes=settings.max_body_bytes,
    )
    logger.info("cold start: keys loaded (%r), %r", masker, handler)
    return handler


def use_json_lines(target: logging.Logger, level: str = "INFO") -> None:
    """Every handler of `target` writes JSON lines (observability.JsonFormatter); one on stdout if none.

    In Lambda the runtime has put its own handler on the root logger; only its format is replaced.
    """
    if not target.handlers:
        target.addHandler(logging.StreamHandler(sys.stdout))
    for log_handler in target.handlers:
        log_handler.setFormatter(JsonFormatter())
    wanted = logging.getLevelName(level.upper())  # its number, if it names a level
    target.setLevel(wanted if isinstance(wanted, int) else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_handler: SqsBatchHandler | None = None


def handler(event: Mapping[str, Any], context: Any) -> dict[str, list[dict[str, str]]]:
    """The function's entry point (`lambda_handler.handler`)."""
    global _handler
    if _handler is None:
        if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):  # in the Lambda runtime, not in a test
            use_json_lines(logging.getLogger(), os.environ.get("LOG_LEVEL", "INFO"))
        try:
            _handler = cold_start(os.environ)
        except Exception as exc:
            # The whole batch comes back; the next invocation tries again. The text names the
            # variable or service at fault, never a key or a password.
            logger.error("cold start failed: %s: %s", type(exc).__name__, exc, extra={"error": type(exc).__name__})
            raise
    return _handler.handle(event, context)
