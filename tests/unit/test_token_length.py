"""Constant-length tokens: a token's length says nothing about its value within the field's bucket.

Written against `Masker.mask` alone, so that it runs against the legacy format too (where it fails:
a token was 16 bytes longer than its value).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from pii.masking import KEY_BYTES, Masker

masker = Masker(bytes(range(KEY_BYTES)))
# Values of up to 31 UTF-8 bytes: the "ordinary length" of a device id (one padding bucket).
short_text = st.text(max_size=31).filter(lambda text: len(text.encode("utf-8", "surrogatepass")) <= 31)


@given(st.ip_addresses(), st.ip_addresses())
def test_every_ip_address_v4_or_v6_gives_a_token_of_one_length(
    first: ipaddress._BaseAddress, second: ipaddress._BaseAddress
) -> None:
    assert len(masker.mask("ip", str(first))) == len(masker.mask("ip", str(second)))


def test_short_and_long_ipv4_addresses_give_tokens_of_one_length() -> None:
    # The example of issue 15: visibly different lengths under the legacy format.
    assert (
        len(masker.mask("ip", "1.2.3.4"))
        == len(masker.mask("ip", "203.113.250.101"))
        == len(masker.mask("ip", "2001:db8:85a3::8a2e:370:7334"))
    )


@given(short_text, short_text)
def test_every_device_id_of_ordinary_length_gives_a_token_of_one_length(first: str, second: str) -> None:
    assert len(masker.mask("device_id", first)) == len(masker.mask("device_id", second))


@given(short_text.filter(lambda text: text.strip() != text or not text or text[0].isalpha()), short_text)
def test_a_value_that_is_not_an_ip_has_one_length_too_and_never_that_of_an_ip(text: str, other: str) -> None:
    token = masker.mask("ip", text)
    assert len(token) != len(masker.mask("ip", "1.2.3.4"))
    assert len(token) == len(masker.mask("device_id", other))
