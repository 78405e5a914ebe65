"""Types that cross package boundaries, and the parsing of a login message.

This module imports nothing of ours: `aws`, `pii` and `database` all depend on it,
never on each other.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Protocol, runtime_checkable

import orjson

# Column limits of `user_logins` (the original exercise's DDL). Values that do not fit are
# rejected up front, so that a batch never fails inside PostgreSQL.
MAX_USER_ID_CHARS = 128
MAX_DEVICE_TYPE_CHARS = 32
MAX_LOCALE_CHARS = 32
MAX_APP_VERSION_CHARS = 32
# A masked value must fit varchar(256): "v1." + base64url(16-byte SIV tag + plaintext)
# leaves room for 169 bytes; 128 keeps a margin for longer version prefixes.
MAX_PII_BYTES = 128

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MS_PER_DAY = 86_400_000
# The date objects of the days seen (days since the epoch -> date): a message's day is one dict
# lookup instead of a new date. Messages are of a few days; bounded all the same.
_DAYS: dict[int, date] = {}
_MAX_DAYS_KEPT = 1024
# The create_date of a message without a SentTimestamp (SQS always sends one when asked; another
# source may not): the day of timestamp 0, a constant, so that every delivery of such a message
# gets the same day, hence the same partition, and is stored once. It lands in the default partition.
UNDATED_CREATE_DATE = date(1970, 1, 1)

REQUIRED_FIELDS = ("user_id", "device_type", "ip", "device_id", "app_version")
PII_FIELDS = ("ip", "device_id")
_LIMITS = {
    "user_id": MAX_USER_ID_CHARS,
    "device_type": MAX_DEVICE_TYPE_CHARS,
    "app_version": MAX_APP_VERSION_CHARS,
    "locale": MAX_LOCALE_CHARS,
}


def body_bytes(body: str) -> int:
    """The size of a body as SQS counts it: its UTF-8 bytes (O(1) for ASCII, the usual case)."""
    if body.isascii():
        return len(body)
    return len(body.encode("utf-8", "surrogatepass"))


# The kinds of rejection: the `reason` label of login_etl_messages_rejected_total, set where the
# reason is made (InvalidMessage's `kind`, transform.reject's caller), never read out of its text.
REJECTION_KINDS = (
    "refused_by_database",
    "body_too_large",
    "processing_failed",
    "not_json",
    "missing_field",
    "wrong_type",
    "too_long",
    "not_storable",
)


class InvalidMessage(ValueError):
    """Raised when a message body is not a valid login event; the text is a safe reason.

    The reason never quotes a value from the body, so it can be logged and stored; `kind` is one
    of REJECTION_KINDS.
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


# Built once per message on the ETL's hot path: not frozen (a frozen dataclass's __init__ sets each
# field through object.__setattr__, ~1.2 µs more per object, and three are built per message).
# Nothing mutates one after it is built.
@dataclass(slots=True)
class ReceivedMessage:
    """One SQS message as received: identity, receipt and the raw body."""

    message_id: str
    receipt_handle: str
    body: str = field(repr=False)  # may hold raw PII: never in a repr or a log
    sent_timestamp_ms: int | None = None
    receive_count: int = 1
    # time.monotonic() (or a test's clock) before the receive that returned it: the writer decides by
    # it whether a quarantine committed since can hold this message (0.0: unknown, always checked).
    received_at: float = field(default=0.0, compare=False)

    @property
    def sent_date(self) -> date | None:
        """The UTC day of sent_at (the row's create_date), without building a datetime: hot path."""
        if self.sent_timestamp_ms is None:
            return None
        day = self.sent_timestamp_ms // _MS_PER_DAY
        found = _DAYS.get(day)
        if found is None:
            if len(_DAYS) >= _MAX_DAYS_KEPT:
                _DAYS.clear()
            found = _DAYS[day] = date.fromordinal(_EPOCH_ORDINAL + day)
        return found

    @property
    def create_date(self) -> date:
        """The row's create_date: a function of the message alone (never of the clock), so that a
        redelivery on another day lands in the same daily partition and is refused as a duplicate."""
        return self.sent_date or UNDATED_CREATE_DATE

    @property
    def sent_at(self) -> datetime | None:
        """The time SQS accepted the message (UTC), if the attribute was present."""
        if self.sent_timestamp_ms is None:
            return None
        return datetime.fromtimestamp(self.sent_timestamp_ms / 1000, tz=timezone.utc)


@dataclass(slots=True)  # not frozen: see ReceivedMessage
class LoginEvent:
    """A parsed, validated login event. Holds raw PII: it never leaves the process."""

    user_id: str
    device_type: str
    ip: str = field(repr=False)
    device_id: str = field(repr=False)
    locale: str | None
    app_version: str

    @classmethod
    def from_body(cls, body: str) -> LoginEvent:
        """Parse and validate a message body; raise InvalidMessage with a safe reason."""
        data = _load_json_object(body)
        ordinary = _ordinary_fields(data)
        if ordinary is not None:
            return cls(*ordinary)
        return cls.validated(data)

    @classmethod
    def validated(cls, data: dict[str, Any]) -> LoginEvent:
        """Validate a parsed body field by field: the LoginEvent, or InvalidMessage naming the first
        thing wrong. What `from_body` falls back to when the body is not an ordinary one."""
        values: dict[str, Any] = {}
        for name in REQUIRED_FIELDS:
            value = data.get(name)
            if not isinstance(value, str):
                if value is None:
                    raise InvalidMessage(f"missing required field {name!r}", "missing_field")
                raise InvalidMessage(f"field {name!r} must be a string, got {_json_type(value)}", "wrong_type")
            if not value or value.isspace():
                raise InvalidMessage(f"field {name!r} is empty", "missing_field")
            _check_storable(name, value)
            values[name] = value
        locale = values["locale"] = data.get("locale")
        if locale is not None:
            if not isinstance(locale, str):
                raise InvalidMessage(f"field 'locale' must be a string or null, got {_json_type(locale)}", "wrong_type")
            _check_storable("locale", locale)
        return cls(**values)


@dataclass(slots=True)  # not frozen: see ReceivedMessage
class MaskedLogin:
    """A row of `user_logins`: PII already replaced by tokens."""

    message_id: str
    user_id: str
    device_type: str
    masked_ip: str
    masked_device_id: str
    locale: str | None
    app_version: str
    create_date: date
    masked_network: str | None = None  # the network token of the IP (/24, /48); None: not an IP address


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row of `user_logins_rejected`: why a message was refused, its body encrypted."""

    message_id: str
    reason: str
    encrypted_body: str
    sent_at: datetime | None
    receive_count: int
    kind: str = "other"  # one of REJECTION_KINDS, set where the reason was made (not stored)

    @property
    def create_date(self) -> date | None:
        """The create_date its message's login row would have, if its sent time is known."""
        if self.sent_at is None:
            return None
        return self.sent_at.astimezone(timezone.utc).date()


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one committed batch did."""

    inserted: int
    rejected: int
    duplicates: int
    # The message ids of the quarantine rows this batch stored (for the metrics' reason counts).
    rejected_ids: frozenset[str] = field(default=frozenset(), compare=False)


# The one retry policy of the process (etl/retry.py applies it; main.py configures it with
# --backoff-base-seconds / --backoff-cap-seconds). It lives here, not in etl/retry.py, because it
# crosses into `database/` (the schema set-up, the daily partitions, rekey), which never imports
# a top-level module but this one.
DEFAULT_BASE_SECONDS = 0.2
DEFAULT_CAP_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base_seconds: float = DEFAULT_BASE_SECONDS
    cap_seconds: float = DEFAULT_CAP_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.base_seconds <= self.cap_seconds:
            raise ValueError(f"need 0 < base ({self.base_seconds}) <= cap ({self.cap_seconds})")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after the `attempt`-th failure; never overflows, however long the outage."""
        # Past this exponent the cap rules anyway; 2**attempt itself would overflow a float at ~1,024.
        exponent = min(max(attempt, 0), math.ceil(math.log2(self.cap_seconds / self.base_seconds)) + 1)
        return min(self.cap_seconds, self.base_seconds * 2.0**exponent)

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """A wait drawn uniformly from [0, ceiling(attempt)) (full jitter)."""
        return rng() * self.ceiling(attempt)


class MessageSource(Protocol):
    """Where the consume loop gets messages (aws.sqs.SqsReader; a fake in tests)."""

    def receive(self) -> list[ReceivedMessage]: ...
    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]: ...
    # -> the receipt handles refused (not message ids: two copies of one message may be in one call)
    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]: ...


class ReceiveRoom(Protocol):
    """One receive's share of the consume loop's bytes in hand (etl.batch.Claim).

    A source that learns a response's size before reading it (SQS's Content-Length) `take`s that
    many bytes first: the call waits while they would pass the bound, and a small response never
    waits for room sized for the largest one. `take(None)`: the size is unknown, take `worst_case`
    (10 messages of the queue's MaximumMessageSize). False: the loop is stopping; the source drops
    the response unread (its messages reappear after their visibility timeout).
    """

    worst_case: int

    def take(self, nbytes: int | None) -> bool: ...


@runtime_checkable
class SizedMessageSource(MessageSource, Protocol):
    """A MessageSource that takes room for a response before it reads it (aws.sqs.SqsReader)."""

    def receive_within(self, room: ReceiveRoom) -> list[ReceivedMessage]: ...


class BatchSink(Protocol):
    """Where the consume loop writes, one transaction per batch (database.sqs_postgres.PostgresWriter; a fake)."""

    @property
    def connected(self) -> bool: ...
    def connect(self) -> None: ...
    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult: ...


def _load_json_object(body: str) -> dict[str, Any]:
    try:
        data = orjson.loads(body)  # ~5x faster than the standard library: the ETL's hot path
    except orjson.JSONDecodeError:
        # The standard library decides: it accepts what orjson refuses (NaN, a lone surrogate
        # escaped, an integer past 64 bits), and its error gives the position.
        data = _load_json_slowly(body)
    if not isinstance(data, dict):
        raise InvalidMessage(f"body must be a JSON object, got {_json_type(data)}", "not_json")
    return data


def _load_json_slowly(body: str) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise InvalidMessage("JSON nested too deeply", "not_json") from None
    except ValueError as exc:  # JSONDecodeError
        # The decoder's message can quote the body; keep only its position.
        pos = getattr(exc, "pos", None)
        raise InvalidMessage(f"body is not valid JSON (at character {pos})", "not_json") from None


def _ordinary_fields(data: dict[str, Any]) -> tuple[str, str, str, str, str | None, str] | None:
    """LoginEvent's fields, in order, if the body is an ordinary one, else None.

    Ordinary: every required field a non-blank ASCII string without NUL within its limit, and the
    locale absent, null or such a string. Almost every message is; checking that in a few C calls
    on the joined values is the ETL's hot path. A body that is not ordinary may still be valid
    (non-ASCII text): `LoginEvent.validated` decides, and names what is wrong. A unit property
    test holds the two to the same answer.
    """
    try:
        user_id, device_type = data["user_id"], data["device_type"]
        ip, device_id, app_version = data["ip"], data["device_id"], data["app_version"]
    except KeyError:
        return None
    locale = data.get("locale")
    if not (
        type(user_id) is str
        and type(device_type) is str
        and type(ip) is str
        and type(device_id) is str
        and type(app_version) is str
        and (locale is None or type(locale) is str)
    ):
        return None
    joined = "".join((user_id, device_type, ip, device_id, app_version, locale or ""))
    if (
        "\x00" in joined
        or not joined.isascii()
        or not 0 < len(user_id) <= MAX_USER_ID_CHARS
        or not 0 < len(device_type) <= MAX_DEVICE_TYPE_CHARS
        or not 0 < len(ip) <= MAX_PII_BYTES
        or not 0 < len(device_id) <= MAX_PII_BYTES
        or not 0 < len(app_version) <= MAX_APP_VERSION_CHARS
        or (locale is not None and len(locale) > MAX_LOCALE_CHARS)
        or user_id.isspace()
        or device_type.isspace()
        or ip.isspace()
        or device_id.isspace()
        or app_version.isspace()
    ):
        return None
    return user_id, device_type, ip, device_id, locale, app_version


def _check_storable(name: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidMessage(f"field {name!r} contains a NUL character", "not_storable")
    if name in PII_FIELDS:
        if value.isascii():  # the common case: no surrogates, one byte per character
            size = len(value)
        else:
            size = len(_utf8(name, value))
        if size > MAX_PII_BYTES:
            raise InvalidMessage(f"field {name!r} is longer than {MAX_PII_BYTES} bytes", "too_long")
        return
    if not value.isascii():
        _utf8(name, value)
    if len(value) > _LIMITS[name]:
        raise InvalidMessage(f"field {name!r} is longer than {_LIMITS[name]} characters", "too_long")


def _utf8(name: str, value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"field {name!r} is not valid Unicode (lone surrogate)", "not_storable") from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
