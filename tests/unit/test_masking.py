"""The AES-SIV masking: reversible, deterministic, keyed, authenticated."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models import MAX_PII_BYTES
from pii.masking import (
    BODY_FIELD,
    KEY_BYTES,
    RECENT_TOKENS,
    InvalidKey,
    Masker,
    UnmaskError,
    canonical,
    decode_key,
    generate_key,
)

KEY = bytes(range(KEY_BYTES))
masker = Masker(KEY)


def test_a_masked_value_unmasks_to_the_original() -> None:
    token = masker.mask("ip", "199.172.111.135")
    assert base64.b64decode(token)[:5] == b"\x01\x00\x00\x00\x01"  # Tink's prefix: 0x01, key id 1
    assert "199.172.111.135" not in token
    assert masker.unmask(token) == "199.172.111.135"


def test_the_same_value_and_key_give_the_same_token() -> None:
    assert masker.mask("device_id", "593-47-5928") == Masker(KEY).mask("device_id", "593-47-5928")
    assert masker.mask("device_id", "593-47-5928") != masker.mask("device_id", "593-47-5929")


def test_the_same_text_masks_differently_as_ip_and_as_device_id() -> None:
    assert masker.mask("ip", "1.2.3.4") != masker.mask("device_id", "1.2.3.4")
    assert masker.unmask(masker.mask("device_id", "1.2.3.4")) == "1.2.3.4"


def test_a_token_of_one_field_does_not_unmask_as_another() -> None:
    with pytest.raises(UnmaskError):
        masker.unmask(masker.mask("ip", "1.2.3.4"), fields=("device_id",))


def test_a_different_key_gives_different_tokens_and_cannot_unmask() -> None:
    other = Masker(bytes(reversed(range(KEY_BYTES))))
    token = masker.mask("ip", "10.0.0.1")
    assert other.mask("ip", "10.0.0.1") != token
    with pytest.raises(UnmaskError, match="does not decrypt"):
        other.unmask(token)


def test_every_tampered_character_is_detected() -> None:
    token = masker.mask("ip", "10.0.0.1").rstrip("=")
    for position in range(len(token)):
        flipped = "A" if token[position] != "A" else "B"
        tampered = token[:position] + flipped + token[position + 1 :]
        tampered += "=" * (-len(tampered) % 4)
        try:
            value = masker.unmask(tampered)
        except UnmaskError:
            continue
        # The last base64 character carries padding bits: a flip there can decode to the same bytes.
        assert value == "10.0.0.1" and position == len(token) - 1


@pytest.mark.parametrize(
    "token",
    [
        "",
        "hello",
        "v1.",
        "v1.!!!",
        "v0.abcd",
        "1.abcd",
        "v1.abc.def",
        "AQAAAAE=",
        "AgAAAAEAAAAAAAAAAAAAAAAAAAAA",
        "AQAAAAEAAAAAAAAAAAAAAAAAAAAA!",
    ],
)
def test_a_malformed_token_is_refused_with_a_clear_error(token: str) -> None:
    with pytest.raises(UnmaskError):
        masker.unmask(token)


def test_a_token_of_another_key_version_names_the_version() -> None:
    token = Masker(KEY, version=2).mask("ip", "10.0.0.1")
    with pytest.raises(UnmaskError, match="version 2"):
        masker.unmask(token)


def test_the_longest_accepted_value_fits_varchar_256() -> None:
    for field in ("ip", "device_id"):
        assert len(masker.mask(field, "\u00e9" * (MAX_PII_BYTES // 2))) <= 256
        assert len(masker.mask(field, "x" * MAX_PII_BYTES)) <= 256


def test_keys_are_64_random_bytes_and_bad_keys_are_refused_without_echo() -> None:
    first, second = generate_key(), generate_key()
    assert first != second and len(decode_key(first)) == KEY_BYTES
    short = base64.b64encode(b"x" * 32).decode()
    with pytest.raises(InvalidKey, match="64 bytes, got 32") as info:
        decode_key(short)
    assert short not in str(info.value)
    with pytest.raises(InvalidKey, match="not valid base64"):
        decode_key("not base64 at all!")


def test_the_repr_of_a_masker_never_shows_the_key() -> None:
    assert "KEY" not in repr(masker) and repr(masker) == "Masker(version=1)"


@given(st.sampled_from(["ip", "device_id"]), st.text() | st.ip_addresses().map(str))
def test_any_value_round_trips(field: str, value: str) -> None:
    token = masker.mask(field, value)
    assert masker.mask(field, value) == token
    assert masker.unmask(token) == canonical(field, value)
    assert canonical(field, value) == value or field == "ip"  # only an IP's spelling is canonicalised


def test_a_remembered_token_is_the_one_a_fresh_masker_makes_and_the_memory_is_bounded() -> None:
    used = Masker(KEY)
    values = [f"10.0.{n // 256}.{n % 256}" for n in range(RECENT_TOKENS + 100)]
    first = [used.mask("ip", v) for v in values]
    again = [used.mask("ip", v) for v in reversed(values)]  # the last ones from memory, the first made anew
    fresh = [Masker(KEY).mask("ip", v) for v in values]
    assert first == fresh and again[::-1] == fresh
    assert used.mask("device_id", values[-1]) == Masker(KEY).mask("device_id", values[-1]) != first[-1]
    assert all(len(recent) <= RECENT_TOKENS for recent in used._recent.values())


def test_rejected_bodies_are_not_remembered() -> None:
    used = Masker(KEY)
    used.mask(BODY_FIELD, '{"ip": "10.0.0.1"}')
    used.mask("ip", "10.0.0.1")
    assert set(used._recent) == {"ip", "device_id"}
    assert [list(recent) for recent in used._recent.values()] == [["10.0.0.1"], []]


def test_the_key_check_value_tells_keys_apart_and_holds_nothing_of_the_key() -> None:
    from pii.masking import key_check_value

    one, two = decode_key(generate_key()), decode_key(generate_key())
    masker = Masker.from_keys({1: one, 7: two}, active=7)
    # THEN one key has one check value, two keys two, and the masker knows each version's
    assert key_check_value(one) == key_check_value(bytes(one)) != key_check_value(two)
    assert masker.check_values == {1: key_check_value(one), 7: key_check_value(two)}
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in masker.check_values.values())
    # AND it is not a token, nor any part of the key
    assert key_check_value(one) not in (one.hex(), two.hex()) and key_check_value(one) not in one.hex()
    assert key_check_value(one) not in repr(masker)
