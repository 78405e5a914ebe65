"""Hostile input through the real pipeline: every message loaded or quarantined, nothing leaks."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from database.sqs_postgres import PostgresWriter
from tests.fakes import NOT_SURROGATES

from helpers import GOOD_LOGIN, query, queue_counts
from test_reliability import assert_exactly_once, output, start_etl

pytestmark = pytest.mark.slow

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
    """A PII value carrying a unique marker, so a leak can be searched for."""
    return f"PII{uuid.uuid4().hex[:12]}{draw(st.sampled_from(['', '.1', '-22', ' ', chr(0x1F600)]))}"


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


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(batch=st.lists(bodies, min_size=20, max_size=60))
def test_any_body_is_loaded_or_quarantined_and_no_pii_leaks(etl_env, sqs_client, tmp_path, batch) -> None:
    queue_url = etl_env["SQS_QUEUE_URL"]
    ids = [sqs_client.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"] for body in batch]
    markers = {m for body in batch for m in _markers(body)}
    writer = PostgresWriter(etl_env["DATABASE_URL"])
    writer.connect()  # the tables exist from the first example on (idempotent)
    writer.close()
    previous = {
        r[0]
        for r in query(
            etl_env["DATABASE_URL"],
            "SELECT message_id FROM user_logins UNION ALL SELECT message_id FROM user_logins_rejected",
        )
    }

    process = start_etl(tmp_path, "-v")
    assert process.wait(timeout=120) == 0, output(tmp_path)[-3000:]

    assert queue_counts(sqs_client, queue_url) == (0, 0)
    assert_exactly_once(etl_env["DATABASE_URL"], [*previous, *ids])
    schema = query(etl_env["DATABASE_URL"], "SELECT current_schema()")[0][0]
    dump = subprocess.run(
        ["pg_dump", "--data-only", "-n", schema, etl_env["DATABASE_URL"].split("?")[0]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    logs = output(tmp_path)
    assert [m for m in markers if m in dump or m in logs] == []


def _markers(body: str) -> list[str]:
    start, found = 0, []
    while (at := body.find("PII", start)) != -1:
        found.append(body[at : at + 15])
        start = at + 3
    return found
