"""Hypothesis strategies shared by unit and integration tests: hostile SQS bodies.

`bodies` is what SQS may deliver to the ETL: login-shaped JSON with hostile values (NULs, lone
surrogates escaped as JSON allows, 100,000-character strings, SQL and format strings, bidi
controls), any JSON value, deep nesting, and text that is not JSON. The `ip` and `device_id` of
login-shaped bodies carry a unique marker (`pii_markers`), so a test can search its output for a leak.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from tests.fakes import GOOD_LOGIN, NOT_SURROGATES

PII_MARKER = "PII"
_MARKER_LENGTH = len(PII_MARKER) + 12

# SQS accepts only these characters in a body (#x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD #x10000+);
# NULs and lone surrogates still arrive, JSON-escaped ("\u0000", "\ud800").
sqs_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, categories=NOT_SURROGATES, exclude_characters="\ufffe\uffff")
    | st.sampled_from("\t\n\r"),
    max_size=200,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | sqs_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(sqs_text, inner, max_size=5),
    max_leaves=25,
)
nasty_strings = (
    st.sampled_from(
        [
            "",
            " ",
            "\u0000",
            "\ud800",
            "\udfff",
            "'; DROP TABLE user_logins; --",
            "\\N",
            "\t\n\r\\",
            "x" * 100_000,
            "\u202e\u0301",
            "😀" * 40,
            "NULL",
            "null",
            "${jndi:ldap://x}",
            "%s%s%n",
            "<script>",
        ]
    )
    | sqs_text
)


@st.composite
def pii(draw) -> str:
    """A PII value carrying a marker, so a leak can be searched for (drawn, so that a failure replays)."""
    marker = draw(st.text("0123456789abcdef", min_size=12, max_size=12))
    return f"{PII_MARKER}{marker}{draw(st.sampled_from(['', '.1', '-22', ' ', chr(0x1F600)]))}"


@st.composite
def login_like(draw) -> str:
    data: dict[str, object] = dict(GOOD_LOGIN)
    data["ip"] = draw(pii())
    data["device_id"] = draw(pii())
    for name in draw(st.sets(st.sampled_from([*GOOD_LOGIN, "extra"]), max_size=3)):
        data[name] = draw(nasty_strings | json_values)
    if draw(st.booleans()):
        data.pop(draw(st.sampled_from(sorted(data))), None)
    text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a raw lone surrogate: SQS would refuse the body, so escape it
        text = json.dumps(data)
    return text


bodies = st.one_of(
    login_like(),
    json_values.map(json.dumps),
    sqs_text,
    st.integers(100, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(100, 5000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    nasty_strings.map(lambda s: json.dumps({**GOOD_LOGIN, "user_id": s})),
).filter(lambda body: 0 < len(body.encode("utf-8", "surrogatepass")) <= 200_000)


def pii_markers(body: str) -> list[str]:
    """The PII markers a body holds (see `pii`): search any output for them to find a leak."""
    start, found = 0, []
    while (at := body.find(PII_MARKER, start)) != -1:
        found.append(body[at : at + _MARKER_LENGTH])
        start = at + len(PII_MARKER)
    return found


# Valid login bodies on purpose (a property over "any body" must also reach the accepting side):
# every required field a non-empty string within its column, locale a string, null or absent.
_field_text = st.text(alphabet=st.characters(categories=("L", "N", "P", "Zs")), min_size=1, max_size=24).filter(
    str.strip
)
valid_login_objects = st.fixed_dictionaries(
    {
        "user_id": _field_text,
        "device_type": _field_text,
        "ip": st.ip_addresses().map(str) | _field_text,
        "device_id": _field_text,
        "app_version": _field_text,
    },
    optional={"locale": st.none() | _field_text, "other": st.integers() | _field_text},
)
valid_login_bodies = valid_login_objects.map(json.dumps)


def accepting_share(strategy: st.SearchStrategy[object], accepts: object, examples: int = 300) -> float:
    """The share of `strategy`'s examples for which `accepts(example)` is true (at least a quarter,
    for a property whose main branch is the accepting one)."""
    from hypothesis import HealthCheck, given, settings

    seen: list[bool] = []

    @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def probe(example: object) -> None:
        seen.append(bool(accepts(example)))  # type: ignore[operator]

    probe()
    return sum(seen) / len(seen)
