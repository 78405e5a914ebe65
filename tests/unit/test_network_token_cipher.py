"""Network tokens (issue 32): a keyed deterministic token of an IP's network (/24 for IPv4, IPv4-mapped
included; /48 for IPv6) beside the IP token. Equal networks give equal tokens, different networks
different ones; constant length; Tink decrypts them like the other tokens; they open only as networks
(their associated data is their own); not an IP address: no token."""

from __future__ import annotations

import base64
import ipaddress

import pytest
import tink
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tink import daead, secret_key_access

from pii import encoding
from pii.masking import KEY_BYTES, NETWORK_FIELD, RECENT_TOKENS, Masker, UnmaskError, decode_key, generate_key
from pii.tink_keyset import keyset_json

daead.register()
K1, K2 = decode_key(generate_key()), decode_key(generate_key())
masker = Masker(bytes(range(KEY_BYTES)))
masker_k1 = Masker(K1, version=1)
KEYRING = Masker.from_keys({1: K1, 4_000_000_000: K2}, active=4_000_000_000)
TINK = tink.json_proto_keyset_format.parse(
    keyset_json({1: K1, 4_000_000_000: K2}, 4_000_000_000), secret_key_access.TOKEN
).primitive(daead.DeterministicAead)

# Valid addresses built on purpose from a network and a host part (not text filtered afterwards).
v4_networks = st.integers(0, 2**24 - 1)
v6_networks = st.integers(0, 2**48 - 1)
v4_hosts = st.integers(0, 2**8 - 1)
v6_hosts = st.integers(0, 2**80 - 1)


def v4(network: int, host: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(network << 8 | host)


def v6(network: int, host: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(network << 80 | host)


def written(address: ipaddress.IPv4Address | ipaddress.IPv6Address, form: int) -> str:
    """One of the ways an address may be written: canonical, IPv4-mapped, exploded, upper case."""
    if isinstance(address, ipaddress.IPv4Address):
        return str(address) if form % 2 == 0 else f"::ffff:{address}"
    return (str(address), address.exploded, str(address).upper())[form % 3]


forms = st.integers(0, 5)


def expected_plaintext(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The documented plaintext, computed with `ipaddress` alone: the network's 16 bytes, then its prefix."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # counts as IPv4
    if isinstance(address, ipaddress.IPv4Address):
        network = ipaddress.IPv4Network(f"{address}/24", strict=False).network_address
        return bytes(10) + b"\xff\xff" + network.packed + bytes([24])
    return ipaddress.IPv6Network(f"{address}/48", strict=False).network_address.packed + bytes([48])


@settings(max_examples=300, deadline=None)
@given(v4_networks, v4_hosts, v4_hosts, forms, forms)
def test_two_ipv4_addresses_of_one_slash_24_written_any_way_give_one_network_token(
    network: int, a: int, b: int, form_a: int, form_b: int
) -> None:
    first, second = written(v4(network, a), form_a), written(v4(network, b), form_b)
    assert masker.mask_network(first) == masker.mask_network(second)
    assert masker.unmask(masker.mask_network(first)) == str(ipaddress.IPv4Network(f"{v4(network, 0)}/24"))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(v6_networks, v6_hosts, v6_hosts, forms, forms)
def test_two_ipv6_addresses_of_one_slash_48_written_any_way_give_one_network_token(
    network: int, a: int, b: int, form_a: int, form_b: int
) -> None:
    # ::/48 holds the IPv4-mapped range (::ffff:0:0/96), whose addresses count as IPv4 by design
    assume(v6(network, a).ipv4_mapped is None and v6(network, b).ipv4_mapped is None)
    first, second = written(v6(network, a), form_a), written(v6(network, b), form_b)
    assert masker.mask_network(first) == masker.mask_network(second)
    assert masker.unmask(masker.mask_network(first)) == str(ipaddress.IPv6Network(f"{v6(network, 0)}/48"))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.tuples(st.just(4), v4_networks, v4_hosts), st.tuples(st.just(6), v6_networks, v6_hosts)),
    st.one_of(st.tuples(st.just(4), v4_networks, v4_hosts), st.tuples(st.just(6), v6_networks, v6_hosts)),
    forms,
    forms,
)
def test_addresses_of_different_networks_give_different_network_tokens(
    first: tuple[int, int, int], second: tuple[int, int, int], form_a: int, form_b: int
) -> None:
    (family_a, net_a, host_a), (family_b, net_b, host_b) = first, second
    a = v4(net_a, host_a) if family_a == 4 else v6(net_a, host_a)
    b = v4(net_b, host_b) if family_b == 4 else v6(net_b, host_b)
    assume(not any(isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped for x in (a, b)))  # those count as IPv4
    same_network = family_a == family_b and net_a == net_b
    token_a, token_b = masker.mask_network(written(a, form_a)), masker.mask_network(written(b, form_b))
    assert (token_a == token_b) == same_network


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(), forms)
def test_tink_decrypts_a_network_token_to_the_documented_plaintext_and_makes_the_same_bytes(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, form: int
) -> None:
    token = KEYRING.mask_network(written(address, form))
    assert token is not None and len(token) == 52  # one length for every network, v4 or v6
    sealed = base64.b64decode(token)
    assert sealed[:5] == b"\x01" + (4_000_000_000).to_bytes(4, "big")
    plain = TINK.decrypt_deterministically(sealed, b"ip_network")
    assert plain == expected_plaintext(address)
    assert TINK.encrypt_deterministically(plain, b"ip_network") == sealed


def test_the_documented_examples() -> None:
    assert masker.unmask(masker.mask_network("203.0.113.77")) == "203.0.113.0/24"  # type: ignore[arg-type]
    assert masker.unmask(masker.mask_network("::ffff:203.0.113.200")) == "203.0.113.0/24"  # type: ignore[arg-type]
    assert masker.unmask(masker.mask_network("2001:DB8:1:2::9")) == "2001:db8:1::/48"  # type: ignore[arg-type]
    # An IPv4-compatible (not mapped) address is an IPv6 address: its /48 is ::/48.
    assert masker.unmask(masker.mask_network("::203.0.113.1")) == "::/48"  # type: ignore[arg-type]
    assert masker.mask_network("203.0.113.77") != masker.mask_network("203.0.114.77")
    assert masker.mask_network("2001:db8:1::1") != masker.mask_network("2001:db8:2::1")
    # An IPv4 network and the IPv6 network of the same bytes are not one network.
    assert masker.mask_network("0.0.0.1") != masker.mask_network("::1")


@pytest.mark.parametrize(
    "value", ["unknown", "01.2.3.4", "fe80::1%eth0", " 1.2.3.4", "1.2.3.4 ", "203.0.113.0/24", "", "1.2.3", "\ud800"]
)
def test_a_value_that_is_not_an_ip_address_has_no_network_token(value: str) -> None:
    assert masker.mask_network(value) is None
    assert encoding.encode_network(value) is None
    assert len(encoding.encode_ip(value)) != encoding.IP_BYTES  # exactly the values the ip token pads


def test_a_network_token_never_opens_as_an_ip_token_nor_an_ip_token_as_a_network() -> None:
    network = masker.mask_network("203.0.113.7")
    ip = masker.mask("ip", "203.0.113.0")  # the same 16 address bytes as the network's
    assert network is not None and network != ip
    with pytest.raises(UnmaskError, match="does not decrypt"):
        masker.unmask(network, ("ip", "device_id"))
    with pytest.raises(UnmaskError, match="does not decrypt"):
        masker.unmask(ip, (NETWORK_FIELD,))
    with pytest.raises(UnmaskError):
        masker.network_of_token(network)  # only an ip token gives a network
    with pytest.raises(tink.TinkError):
        TINK.decrypt_deterministically(base64.b64decode(KEYRING.mask_network("203.0.113.7")), b"ip")  # type: ignore[arg-type]
    # By default unmask names the network, never an address.
    assert masker.unmask(network) == "203.0.113.0/24"


def test_a_tampered_network_plaintext_is_refused_even_when_authentic() -> None:
    # Made with our key by other code: host bits set, or a prefix other than the documented one.
    for plain in (bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 7, 24]), bytes(16) + bytes([64])):
        token = base64.b64encode(b"\x01\x00\x00\x00\x01" + masker._cipher.encrypt(plain, [b"ip_network"])).decode()
        with pytest.raises(UnmaskError, match="not a network"):
            masker.unmask(token)


def test_the_network_token_of_an_ip_token_is_the_network_token_of_its_address() -> None:
    old = Masker(K1, version=1)
    for value in ("198.51.100.23", "2001:db8:abcd:12::1", "::ffff:198.51.100.1"):
        assert KEYRING.network_of_token(old.mask("ip", value)) == KEYRING.mask_network(value)
    assert KEYRING.network_of_token(old.mask("ip", "not an address")) is None
    with pytest.raises(UnmaskError):
        KEYRING.network_of_token(old.mask("device_id", "198.51.100.23"))


def test_rekey_turns_a_network_token_of_an_old_key_into_the_active_keys() -> None:
    old = Masker(K1, version=1).mask_network("198.51.100.23")
    assert old is not None and not KEYRING.is_current(old)
    new = KEYRING.rekey(old)
    assert new == KEYRING.mask_network("198.51.100.99") and KEYRING.is_current(new)
    assert KEYRING.unmask(new) == "198.51.100.0/24"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.ip_addresses().map(str) | st.text(max_size=40), min_size=1, max_size=30))
def test_mask_ip_gives_the_ip_token_and_the_network_token_of_each_value_cached_or_not(values: list[str]) -> None:
    fresh = Masker(K1, version=1)
    for value in values + values:  # the second time from its cache
        assert fresh.mask_ip(value) == (masker_k1.mask("ip", value), masker_k1.mask_network(value))


def test_the_caches_of_mask_ip_stay_bounded() -> None:
    used = Masker(K1, version=1)
    for n in range(RECENT_TOKENS + 10):
        used.mask_ip(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert len(used._recent_ips) <= RECENT_TOKENS and len(used._recent_networks) <= RECENT_TOKENS
