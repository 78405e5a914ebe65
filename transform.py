"""What happens to each message, as plain functions: the size policy, parse and mask, quarantine,
the poison rule.

And `Batch`: the messages of one transaction, what to write for them, and which of them may be
deleted once it has committed; `reason_kind`: the bounded kind of a rejection reason (a metric
label); `retry_quarantined`: today's validation of a quarantined message (`replay`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from models import REJECTION_KINDS, InvalidMessage, LoginEvent, MaskedLogin, ReceivedMessage, Rejection, body_bytes
from pii.masking import BODY_FIELD, Masker

logger = logging.getLogger(__name__)

# The size policy: a body larger than this (UTF-8 bytes, as SQS counts) is quarantined without being
# parsed (--max-body-bytes, MAX_BODY_BYTES). A login event is a few hundred bytes; SQS takes up to 1 MiB.
DEFAULT_MAX_BODY_BYTES = 65_536
# What is kept of such a body: its first bytes, encrypted, behind a marker that says so (replay
# refuses it: it is not the message). Its length and SHA-256 are in the reason.
TOO_LARGE_PREFIX_BYTES = 4096
TOO_LARGE = "body too large"
TRUNCATED_MARKER = "[login-etl: body too large, only its first bytes kept] "

# The `reason` label of login_etl_messages_rejected_total: a Rejection's kind, or "other".
REASON_LABELS = (*REJECTION_KINDS, "other")


def transform(message: ReceivedMessage, masker: Masker) -> MaskedLogin | Rejection:
    """Parse and mask one message: a row for `user_logins`, or a Rejection with its reason.

    Fields other than the event's are ignored: a valid event is stored without them. The size
    policy comes first, in `prepare` (`too_large`).
    """
    try:
        event = LoginEvent.from_body(message.body)
    except InvalidMessage as exc:
        return reject(message, masker, str(exc), exc.kind)
    masked_ip, masked_network = masker.mask_ip(event.ip)
    return MaskedLogin(
        message_id=message.message_id,
        user_id=event.user_id,
        device_type=event.device_type,
        masked_ip=masked_ip,
        masked_device_id=masker.mask("device_id", event.device_id),
        locale=event.locale,
        app_version=event.app_version,
        create_date=message.create_date,
        masked_network=masked_network,
    )


def reject(message: ReceivedMessage, masker: Masker, reason: str, kind: str) -> Rejection:
    """A Rejection whose body is encrypted whole (a bad body may hold PII anywhere); `kind`, one of
    models.REJECTION_KINDS, says what `reason` says in words."""
    return Rejection(
        message_id=message.message_id,
        reason=reason,
        encrypted_body=masker.mask(BODY_FIELD, message.body),
        sent_at=message.sent_at,
        receive_count=message.receive_count,
        kind=kind,
    )


def too_large(message: ReceivedMessage, masker: Masker, max_body_bytes: int) -> Rejection | None:
    """The size policy: a body over `max_body_bytes` is quarantined by `reject_too_large` without
    being parsed, whatever it holds (a valid event with large unknown fields too); None otherwise."""
    if len(message.body) <= max_body_bytes // 4:  # so few characters cannot be too many bytes
        return None
    size = body_bytes(message.body)
    return reject_too_large(message, masker, size, max_body_bytes) if size > max_body_bytes else None


def reject_too_large(message: ReceivedMessage, masker: Masker, size: int, limit: int) -> Rejection:
    """A Rejection for a body over the size limit, bounded whatever the body: its first
    TOO_LARGE_PREFIX_BYTES encrypted behind TRUNCATED_MARKER, its length and SHA-256 in the reason
    (enough to match it against the sender's copy; not a value of the body)."""
    body = message.body
    digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
    prefix = body[:TOO_LARGE_PREFIX_BYTES]
    if not prefix.isascii():  # up to 4 bytes a character
        prefix = body[: TOO_LARGE_PREFIX_BYTES // 4]
    kept = body_bytes(prefix)
    return Rejection(
        message_id=message.message_id,
        reason=f"{TOO_LARGE}: {size} bytes, limit {limit}; sha256 {digest}; first {kept} bytes kept",
        encrypted_body=masker.mask(BODY_FIELD, TRUNCATED_MARKER + prefix),
        sent_at=message.sent_at,
        receive_count=message.receive_count,
        kind="body_too_large",
    )


def poison_rule(message: ReceivedMessage, exc: Exception, masker: Masker, max_receives: int) -> Rejection | None:
    """A message whose processing raised: None (leave it for redelivery) until it has looped
    `max_receives` times, then its quarantine row."""
    reason = f"processing failed {message.receive_count} times: {type(exc).__name__}"
    if message.receive_count >= max_receives:
        logger.error(
            "message %s quarantined: %s",
            message.message_id,
            reason,
            extra={"message_id": message.message_id, "reason": reason},
        )
        return reject(message, masker, reason, "processing_failed")
    logger.error(
        "message %s failed (%s, receive %d of %d before quarantine); left for redelivery",
        message.message_id,
        type(exc).__name__,
        message.receive_count,
        max_receives,
        extra={"message_id": message.message_id, "error": type(exc).__name__},
    )
    return None


def retry_quarantined(
    message_id: str,
    encrypted_body: str,
    sent_at: datetime | None,
    masker: Masker,
) -> MaskedLogin | str:
    """Today's validation of a quarantined message: its row for `user_logins`, or why it still fails.

    The body is decrypted in memory only and never returned, logged or put in the reason (reasons
    never quote a value). Raises MaskingError when the body does not decrypt under the keys held.
    """
    body = masker.unmask(encrypted_body, (BODY_FIELD,))
    if body.startswith(TRUNCATED_MARKER):
        return f"{TOO_LARGE}: only its first bytes were kept, it cannot be replayed"
    sent_ms = None if sent_at is None else int(sent_at.timestamp() * 1000)
    message = ReceivedMessage(message_id, "", body, sent_timestamp_ms=sent_ms)
    try:
        result = transform(message, masker)
    except Exception as exc:  # noqa: BLE001 - the bug that quarantined it may still be there
        return f"processing failed on replay: {type(exc).__name__}"
    return result.reason if isinstance(result, Rejection) else result


@dataclass(slots=True)
class Prepared:
    """Messages of one receive, parsed and masked: rows, rejections, and those left for redelivery.

    `nbytes`: what it holds in memory, roughly: the bodies still held and the encrypted bodies of
    its rejections (the consume loop's bound on bytes in hand counts it).
    """

    messages: list[ReceivedMessage]
    rows: list[MaskedLogin] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    failed: list[ReceivedMessage] = field(default_factory=list)
    nbytes: int = 0


def prepare(
    messages: list[ReceivedMessage], masker: Masker, max_receives: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Prepared:
    """Transform each message; one that raises unexpectedly goes through the poison rule.

    The body of a message quarantined as too large is let go at once (emptied): only its bounded
    Rejection is kept, so a flood of large bodies does not stay in memory until the commit.
    """
    prepared = Prepared(messages)
    nbytes = 0
    for message in messages:
        result: MaskedLogin | Rejection | None
        try:
            result = too_large(message, masker, max_body_bytes) or transform(message, masker)
        except Exception as exc:  # noqa: BLE001 - a bug or an unexpected condition, not a bad body
            result = poison_rule(message, exc, masker, max_receives)
        if result is None:
            prepared.failed.append(message)
        elif isinstance(result, Rejection):
            prepared.rejections.append(result)
            nbytes += len(result.encrypted_body)
            if result.reason.startswith(TOO_LARGE):
                message.body = ""  # not needed again: the Rejection holds what is kept of it
            logger.warning(
                "message %s rejected: %s",
                message.message_id,
                result.reason,
                extra={"message_id": message.message_id, "reason": result.reason},
            )
        else:
            prepared.rows.append(result)
        nbytes += body_bytes(message.body)
    prepared.nbytes = nbytes
    return prepared


class Batch:
    """The messages of one transaction, keyed by message id.

    A message received twice in one batch (SQS delivers at least once) is written once. If one copy
    was transformed and another raised, the message is stored all the same, so every copy's receipt
    is deleted after the commit: none is left in hand.
    """

    def __init__(self, parts: Sequence[Prepared]) -> None:
        self.messages = [m for part in parts for m in part.messages]
        self.rows = {row.message_id: row for part in parts for row in part.rows}
        self.rejections = {r.message_id: r for part in parts for r in part.rejections}
        self._by_id = {m.message_id: m for m in self.messages}
        self._failed_ids = {m.message_id for part in parts for m in part.failed}
        self._fallbacks: set[str] = set()

    @property
    def redelivered(self) -> int:
        return sum(1 for m in self.messages if m.receive_count > 1)

    def quarantine_refused(
        self, logins: Sequence[tuple[MaskedLogin, str]], rejections: Sequence[tuple[Rejection, str]], masker: Masker
    ) -> None:
        """Rows PostgreSQL refused alone: a login becomes a rejection with PostgreSQL's reason; a
        rejection is replaced by a minimal one; a minimal one refused too leaves its message for
        redelivery (SQS dead-letters it after the RedrivePolicy's maxReceiveCount)."""
        for login, reason in logins:
            del self.rows[login.message_id]
            self.rejections[login.message_id] = reject(
                self._by_id[login.message_id], masker, reason, "refused_by_database"
            )
            logger.warning(
                "message %s rejected: %s",
                login.message_id,
                reason,
                extra={"message_id": login.message_id, "reason": reason},
            )
        for rejection, reason in rejections:
            message_id = rejection.message_id
            if message_id in self._fallbacks:
                del self.rejections[message_id]
                self._failed_ids.add(message_id)
                logger.error(
                    "message %s cannot be stored in either table (%s); left for redelivery",
                    message_id,
                    reason,
                    extra={"message_id": message_id, "reason": reason},
                )
                continue
            self._fallbacks.add(message_id)
            self.rejections[message_id] = Rejection(
                message_id=message_id,
                reason=f"quarantine row {reason}; original reason dropped",
                encrypted_body=rejection.encrypted_body,
                sent_at=None,
                receive_count=1,
                kind="refused_by_database",
            )
            logger.warning(
                "message %s: its quarantine row was refused (%s); storing a minimal one",
                message_id,
                reason,
                extra={"message_id": message_id, "reason": reason},
            )

    @property
    def failed(self) -> list[ReceivedMessage]:
        """Copies of messages neither stored nor quarantined: left to come back after the timeout."""
        stored = self.rows.keys() | self.rejections.keys()
        return [m for m in self.messages if m.message_id in self._failed_ids and m.message_id not in stored]

    def deletable(self) -> list[ReceivedMessage]:
        """After the commit: every receipt of every message the transaction stored or quarantined."""
        stored = self.rows.keys() | self.rejections.keys()
        return [m for m in self.messages if m.message_id in stored]


class RecentQuarantine:
    """The ids this process quarantined lately (bounded): a later batch holding one of them must be
    written with the one-table check, even if its copy is a first delivery. (SQS can deliver a
    message twice at once; the poison rule may quarantine one copy while the other loads.)"""

    def __init__(self, size: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def remember(self, message_ids: Iterable[str]) -> None:
        for message_id in message_ids:
            self._ids[message_id] = None
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def holds_any(self, message_ids: Iterable[str]) -> bool:
        return any(message_id in self._ids for message_id in message_ids)
