"""What happens to each message, as plain functions: the size policy, parse and mask, quarantine,
the poison rule.

Also `retry_quarantined`: today's validation of a quarantined message (`replay`). A batch of them,
the messages of one transaction, is etl/batch.py's `Batch`.
"""

from __future__ import annotations

import hashlib
import logging
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
