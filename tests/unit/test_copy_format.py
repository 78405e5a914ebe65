"""The COPY text format the writer produces: escapes and NULLs, checked by decoding it back."""

from __future__ import annotations

from datetime import date

from hypothesis import given
from hypothesis import strategies as st

from database.copy_format import copy_text
from models import MaskedLogin
from tests.fakes import NOT_SURROGATES

_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def decode(line: str) -> list[str | None]:
    """Decode one COPY text line the way PostgreSQL does (for the escapes we emit)."""
    fields: list[str | None] = []
    for raw in line.split("\t"):
        if raw == "\\N":
            fields.append(None)
            continue
        out, i = [], 0
        while i < len(raw):
            pair = raw[i : i + 2]
            if pair in _UNESCAPE:
                out.append(_UNESCAPE[pair])
                i += 2
            else:
                out.append(raw[i])
                i += 1
        fields.append("".join(out))
    return fields


text = st.text(alphabet=st.characters(exclude_characters="\x00", categories=NOT_SURROGATES), max_size=20)


networks = st.none() | st.just("AQAAAAHk2y1wTw0lsF3o2nn1VS7a0YI5gR2c8rO2kx1bCwGfAkBo")


@given(st.lists(st.tuples(text, text, text, st.none() | text, networks), min_size=1, max_size=5))
def test_every_row_decodes_back_to_its_values(rows: list[tuple[str, str, str, str | None, str | None]]) -> None:
    logins = [
        MaskedLogin(f"m{i}", user, device, "v1.a", "v1.b", locale, version, date(2026, 1, 2), network)
        for i, (user, device, version, locale, network) in enumerate(rows)
    ]
    lines = copy_text(logins).split("\n")
    assert lines[-1] == "" and len(lines) == len(logins) + 1
    for login, line in zip(logins, lines, strict=False):
        assert decode(line) == [
            login.message_id,
            login.user_id,
            login.device_type,
            "v1.a",
            "v1.b",
            login.app_version,
            "2026-01-02",
            login.locale,
            login.masked_network,
        ]
