"""Rows in COPY's text format, for the writer's COPYs (tab-separated, \\N for NULL, backslash escapes),
and the COPY itself (copy_in: the data encoded once, read in one go)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from psycopg2.extensions import cursor as Cursor
from psycopg2.extensions import encodings

from models import MaskedLogin, Rejection

COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

# user_logins_rejected_stage's columns, in rejection_copy_text's order.
REJECTED_STAGE_COLUMNS = "message_id, reason, sent_at, receive_count, encrypted_body, day"


def copy_text(logins: Sequence[MaskedLogin]) -> str:
    """Rows in COPY text format (tab-separated, \\N for NULL, backslash escapes).

    Fast path: values almost never hold a tab, newline or backslash, so each row is joined once
    and checked; only a row that needs it is escaped field by field.
    """
    lines = []
    dates: dict[object, str] = {}
    for row in logins:
        day = dates.get(row.create_date)
        if day is None:
            day = dates[row.create_date] = row.create_date.isoformat()
        fields = (
            row.message_id,
            row.user_id,
            row.device_type,
            row.masked_ip,
            row.masked_device_id,
            row.app_version,
            day,
        )
        head = "\t".join(fields)
        if head.count("\t") != 6 or "\\" in head or "\n" in head or "\r" in head:
            head = "\t".join(f.translate(COPY_ESCAPES) for f in fields)
        locale = "\\N" if row.locale is None else row.locale.translate(COPY_ESCAPES)
        network = row.masked_network or "\\N"  # base64: nothing to escape
        lines.append(f"{head}\t{locale}\t{network}")
    lines.append("")
    return "\n".join(lines)


def rejection_copy_text(rejections: Sequence[Rejection]) -> str:
    """Quarantine rows in COPY text format, for user_logins_rejected_stage (every text escaped:
    a reason may hold anything PostgreSQL said)."""
    lines = []
    for r in rejections:
        sent = "\\N" if r.sent_at is None else r.sent_at.isoformat()
        day = "\\N" if r.create_date is None else r.create_date.isoformat()
        message_id, reason = r.message_id.translate(COPY_ESCAPES), r.reason.translate(COPY_ESCAPES)
        body = r.encrypted_body  # a token (base64): nothing to escape; checked, as translate() costs on 90 KB
        if "\\" in body or "\t" in body or "\n" in body or "\r" in body:
            body = body.translate(COPY_ESCAPES)
        lines.append(f"{message_id}\t{reason}\t{sent}\t{r.receive_count}\t{body}\t{day}")
    lines.append("")
    return "\n".join(lines)


def copy_data(cur: Cursor, text: str) -> bytes:
    """COPY's text in the connection's encoding, encoded once: a StringIO would hold the text as 4
    bytes a character (16 MiB of quarantined bodies: 64 MiB more), and psycopg2 encode each read."""
    return text.encode(encodings[cur.connection.encoding])


def copy_in(cur: Cursor, statement: str, data: bytes) -> None:
    """COPY … FROM STDIN of `data` in one read: each read is a trip back into Python (and a wait for
    the GIL while the receivers parse and mask), so the default 8 KiB chunks cost. BytesIO shares
    the bytes it wraps, and returns them whole to that one read: no copy."""
    cur.copy_expert(statement, io.BytesIO(data), size=max(8192, len(data)))
