"""Parsing and validation of login message bodies."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import MAX_PII_BYTES, InvalidMessage, LoginEvent, ReceivedMessage
from tests import strategies
from tests.fakes import GOOD_LOGIN as GOOD  # the exercise's sample message, shared with the integration tests


def body(**changes: object) -> str:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


def reason_of(text: str) -> str:
    with pytest.raises(InvalidMessage) as info:
        LoginEvent.from_body(text)
    return str(info.value)


def test_a_valid_body_parses_with_app_version_kept_as_text() -> None:
    event = LoginEvent.from_body(body(app_version="2.00"))
    assert event.app_version == "2.00"
    assert (event.user_id, event.device_type, event.ip, event.device_id, event.locale) == (
        GOOD["user_id"],
        "android",
        "199.172.111.135",
        "593-47-5928",
        "RU",
    )


def test_locale_may_be_null_or_absent_and_extra_keys_are_ignored() -> None:
    assert LoginEvent.from_body(body(locale=None)).locale is None
    assert LoginEvent.from_body(body(locale=...)).locale is None
    assert LoginEvent.from_body(body(extra={"nested": [1, 2]})).user_id == GOOD["user_id"]


def test_the_repr_of_an_event_hides_ip_and_device_id() -> None:
    text = repr(LoginEvent.from_body(body()))
    assert GOOD["ip"] not in text and GOOD["device_id"] not in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo=bar", "not valid JSON"),
        ('{"user_id": "x"', "not valid JSON"),
        ("", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "must be a JSON object, got array"),
        ('"just a string"', "must be a JSON object, got string"),
        ("null", "must be a JSON object, got null"),
        ("42", "must be a JSON object, got number"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_rejected(text: str, expected: str) -> None:
    assert expected in reason_of(text)


@pytest.mark.parametrize("name", ["user_id", "device_type", "ip", "device_id", "app_version"])
def test_a_missing_or_null_required_field_is_rejected(name: str) -> None:
    assert reason_of(body(**{name: ...})) == f"missing required field {name!r}"
    assert reason_of(body(**{name: None})) == f"missing required field {name!r}"


@pytest.mark.parametrize("value", [230, 2.3, True, ["a"], {"a": 1}])
def test_a_required_field_of_the_wrong_type_is_rejected(value: object) -> None:
    assert "must be a string" in reason_of(body(app_version=value))


def test_an_empty_required_field_is_rejected() -> None:
    assert reason_of(body(user_id="  ")) == "field 'user_id' is empty"


def test_a_locale_of_the_wrong_type_is_rejected() -> None:
    assert reason_of(body(locale=7)) == "field 'locale' must be a string or null, got number"


@pytest.mark.parametrize(
    ("name", "limit"), [("user_id", 128), ("device_type", 32), ("locale", 32), ("app_version", 32)]
)
def test_a_value_longer_than_its_column_is_rejected_and_one_that_fits_is_not(name: str, limit: int) -> None:
    LoginEvent.from_body(body(**{name: "x" * limit}))
    assert reason_of(body(**{name: "x" * (limit + 1)})) == f"field {name!r} is longer than {limit} characters"


@pytest.mark.parametrize("name", ["ip", "device_id"])
def test_an_over_long_pii_value_is_rejected(name: str) -> None:
    LoginEvent.from_body(body(**{name: "1" * MAX_PII_BYTES}))
    assert "longer than" in reason_of(body(**{name: "1" * (MAX_PII_BYTES + 1)}))


def test_a_nul_character_is_rejected() -> None:
    assert reason_of(body(device_type="and\u0000roid")) == "field 'device_type' contains a NUL character"


def test_a_lone_surrogate_is_rejected() -> None:
    text = body().replace('"RU"', '"\\ud800"')
    assert reason_of(text) == "field 'locale' is not valid Unicode (lone surrogate)"


def test_a_rejection_reason_never_quotes_the_values() -> None:
    for text in (body(ip=123), body(device_id="9" * 200), json.dumps(GOOD)[:-3]):
        reason = reason_of(text)
        assert "199.172.111.135" not in reason and "593-47-5928" not in reason and "999" not in reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)


# Any text: valid bodies, valid bodies cut short or with a character changed, and text at random.
any_text = (
    strategies.valid_login_bodies
    | strategies.valid_login_bodies.map(str)  # weighted twice: the accepting side a quarter of the time, with margin
    | st.tuples(strategies.valid_login_bodies, st.integers(0, 200), st.characters()).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
    )
    | st.text()
)
# Any JSON object: valid login objects, ones with a field replaced by any JSON value, any object.
any_object = (
    strategies.valid_login_objects
    | strategies.valid_login_objects.map(dict)  # weighted twice, as any_text's
    | st.tuples(strategies.valid_login_objects, st.sampled_from([*GOOD, "other"]), json_values).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    | st.dictionaries(st.sampled_from([*GOOD, "other"]), json_values)
)


def _parses(text: str) -> bool:
    try:
        LoginEvent.from_body(text)
    except InvalidMessage:
        return False
    return True


def test_the_properties_over_any_body_reach_the_accepting_side_a_quarter_of_the_time() -> None:
    assert strategies.accepting_share(any_text, _parses) >= 0.25
    assert strategies.accepting_share(any_object, lambda data: _parses(json.dumps(data))) >= 0.25


@settings(suppress_health_check=[HealthCheck.too_slow])  # nested JSON values: slow on a loaded machine
@given(any_text)
def test_any_text_either_parses_or_is_rejected_with_a_reason(text: str) -> None:
    try:
        LoginEvent.from_body(text)
    except InvalidMessage as exc:
        assert str(exc)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(any_object)
def test_any_json_object_either_parses_or_is_rejected_with_a_reason(data: dict[str, object]) -> None:
    try:
        event = LoginEvent.from_body(json.dumps(data))
    except InvalidMessage as exc:
        assert str(exc)
    else:
        assert event.ip == data["ip"] and event.device_id == data["device_id"]


def _field_by_field(text: str) -> LoginEvent | str:
    try:
        return LoginEvent.validated(json.loads(text))
    except InvalidMessage as exc:
        return str(exc)


def _from_body(text: str) -> LoginEvent | str:
    try:
        return LoginEvent.from_body(text)
    except InvalidMessage as exc:
        return str(exc)


@settings(max_examples=500)
@given(
    strategies.login_like()
    | st.dictionaries(st.sampled_from([*GOOD, "other"]), strategies.nasty_strings | strategies.json_values).map(
        json.dumps
    )
)
def test_the_fast_path_gives_what_the_field_by_field_validation_gives(text: str) -> None:
    """from_body takes a shortcut for ordinary bodies; it must never change an answer: the same
    event, or the same reason."""
    if not isinstance(json.loads(text), dict):
        return
    assert _from_body(text) == _field_by_field(text)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"locale": None},
        {"locale": ""},
        {"user_id": "x" * 128},
        {"user_id": "x" * 129},
        {"device_type": " "},
        {"ip": "1" * MAX_PII_BYTES},
        {"ip": "1" * (MAX_PII_BYTES + 1)},
        {"device_id": "é"},
        {"app_version": "2\x00"},
        {"locale": 7},
    ],
)
def test_the_fast_path_agrees_at_each_limit(changes: dict[str, object]) -> None:
    text = body(**changes)
    assert _from_body(text) == _field_by_field(text)


@given(st.integers(min_value=-(10**13), max_value=10**14))
def test_the_sent_date_is_the_utc_day_of_the_sent_time(sent_ms: int) -> None:
    message = ReceivedMessage(message_id="m", receipt_handle="r", body="{}", sent_timestamp_ms=sent_ms)
    assert message.sent_at is not None
    assert message.sent_date == message.sent_at.date()
