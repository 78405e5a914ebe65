"""The comparison of a keyring's check values with the database's, and the line it ends in."""

from __future__ import annotations

from database.key_checks import mismatch_message, mismatched
from pii.masking import Masker, decode_key, generate_key


def test_only_versions_recorded_with_another_value_are_mismatched() -> None:
    held = Masker.from_keys({1: decode_key(generate_key()), 2: decode_key(generate_key())}, active=2).check_values
    other = Masker(decode_key(generate_key())).check_values[1]
    # a version the database does not know yet is no mismatch; the same value neither
    assert mismatched(held, {}) == []
    assert mismatched(held, {1: held[1], 3: other}) == []
    assert mismatched(held, {1: other, 2: held[2]}) == [1]


def test_the_message_names_the_versions_and_the_ways_out_and_no_value() -> None:
    text = mismatch_message([1, 7])
    assert "\n" not in text and text.startswith("key versions 1, 7: ")
    assert "nothing was read or written" in text and "DATABASE_URL" in text and "MASKING_KEY_VERSION" in text
