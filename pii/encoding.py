"""The plaintext each field is encrypted as: fixed-length forms, so a token's length says nothing.

AES-SIV's ciphertext is exactly as long as its plaintext, so a token of the raw text would tell
``1.2.3.4`` from ``203.113.250.101`` at a glance. Each field is therefore encoded first:

- ``ip``: an IP address as its 16-byte binary form (RFC 4291), an IPv4 address as an IPv4-mapped
  IPv6 address (``::ffff:a.b.c.d``). Every IP token has one length, and one address written two
  ways (``1.2.3.4``, ``::ffff:1.2.3.4``, ``2001:DB8::1``, ``2001:db8::1``) gives one token. Decoding
  gives the canonical text: dotted quad for IPv4 (mapped or not), RFC 5952 for IPv6. A value that
  is not an IP address (a zone id, leading zeros, spaces, anything) is not lost: it takes the padded
  text form below, which is at least 32 bytes and so never 16.
- ``device_id``: the padded text form.
- ``ip_network`` (the network token, `encode_network`): the network of an IP address, 17 bytes: the
  16-byte form above with the host bits zeroed, then one byte, the prefix length in the address's
  own family: /24 for IPv4 (an IPv4-mapped IPv6 address counts as IPv4), /48 for IPv6. Every
  network token has one length. A value that is not an IP address has no network: None (NULL).
- anything else (the rejected body): UTF-8, unpadded.

The padded text form is the UTF-8 of the value, one byte 0x80, then 0x00 bytes up to the next
multiple of 32 bytes (ISO/IEC 7816-4 padding; at least one byte is always added, so it is
unambiguous: strip the trailing 0x00 bytes, then the one 0x80). Values of up to 31 bytes all give
32 bytes; longer ones reveal their length to within 32 bytes.

Text is encoded with ``surrogatepass`` so that any Python string round-trips.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket

from pii.errors import MaskingError

PAD_BLOCK_BYTES = 32
IP_BYTES = 16
_IPV4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96
# The networks of the network token: what web analytics keeps when it truncates an address (the last
# octet of IPv4 zeroed, the last 80 bits of IPv6), as (bytes kept of the 16, prefix length in its family).
IPV4_PREFIX = 24
IPV6_PREFIX = 48
NETWORK_BYTES = IP_BYTES + 1
_V4_KEPT = len(_IPV4_MAPPED) + IPV4_PREFIX // 8  # the mapped prefix and the first three octets
_V6_KEPT = IPV6_PREFIX // 8
# What follows the bytes kept: the host bytes zeroed, then the prefix length.
_V4_TAIL = bytes(IP_BYTES - _V4_KEPT) + bytes([IPV4_PREFIX])
_V6_TAIL = bytes(IP_BYTES - _V6_KEPT) + bytes([IPV6_PREFIX])


class EncodingError(MaskingError, ValueError):
    """Raised when a decrypted plaintext is not in the form its field uses (a foreign token)."""


def pad(data: bytes) -> bytes:
    """`data`, 0x80, then 0x00 bytes up to the next multiple of PAD_BLOCK_BYTES (at least one byte added)."""
    zeros = -(len(data) + 1) % PAD_BLOCK_BYTES
    return data + b"\x80" + bytes(zeros)


def unpad(data: bytes) -> bytes:
    """Undo `pad`; raise EncodingError if `data` is not padded so."""
    stripped = data.rstrip(b"\x00")
    if (
        not data
        or len(data) % PAD_BLOCK_BYTES
        or not stripped.endswith(b"\x80")
        or len(data) - len(stripped) >= PAD_BLOCK_BYTES
    ):
        raise EncodingError("plaintext is not in the padded form")
    return stripped[:-1]


def encode_ip(text: str) -> bytes:
    """16 bytes for an IP address (IPv4 as IPv4-mapped IPv6); the padded text form for anything else.

    ``inet_pton`` is the fast path (the ETL calls this once per message); what it accepts is
    checked against `ipaddress` by the unit tests, so the canonical form does not depend on the C
    library for the forms that matter (dotted quads without leading zeros, RFC 4291 text).
    """
    try:
        return _IPV4_MAPPED + socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):  # ValueError: an embedded NUL or a lone surrogate
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return pad(text.encode("utf-8", "surrogatepass"))


def decode_ip(data: bytes) -> str:
    """The canonical text of an `encode_ip` plaintext; raise EncodingError if it is not one."""
    if len(data) == IP_BYTES:
        if data.startswith(_IPV4_MAPPED):
            return str(ipaddress.IPv4Address(data[IP_BYTES - 4 :]))
        return str(ipaddress.IPv6Address(data))
    return _text(unpad(data))


def encode_network(text: str) -> bytes | None:
    """The network plaintext of an IP address (see the module docstring); None if `text` is not one.

    "Not one" is exactly what `encode_ip` stores in the padded form, so a value has a network token
    if and only if its IP token is of the 16-byte form.
    """
    address = encode_ip(text)
    if len(address) != IP_BYTES:
        return None
    return network_of(address)


def network_of(address: bytes) -> bytes:
    """The network plaintext of a 16-byte address (IPv4-mapped: /24; else /48)."""
    if address.startswith(_IPV4_MAPPED):
        return address[:_V4_KEPT] + _V4_TAIL
    return address[:_V6_KEPT] + _V6_TAIL


def decode_network(data: bytes) -> str:
    """The network's text (``203.0.113.0/24``, ``2001:db8:1::/48``); raise EncodingError if not a network plaintext."""
    if len(data) != NETWORK_BYTES:
        raise EncodingError("plaintext is not a network (17 bytes)")
    address, prefix = data[:IP_BYTES], data[IP_BYTES]
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    if address.startswith(_IPV4_MAPPED):
        network = ipaddress.IPv4Network((address[len(_IPV4_MAPPED) :], prefix), strict=False)
        expected = IPV4_PREFIX
    else:
        network = ipaddress.IPv6Network((address, prefix), strict=False)
        expected = IPV6_PREFIX
    if prefix != expected or network_of(address) != data:
        raise EncodingError("plaintext is not a network of the documented prefix, host bits zero")
    return str(network)


def encode_padded(text: str) -> bytes:
    """The padded text form."""
    return pad(text.encode("utf-8", "surrogatepass"))


def decode_padded(data: bytes) -> str:
    """Undo `encode_padded`; raise EncodingError."""
    return _text(unpad(data))


def encode_text(text: str) -> bytes:
    """UTF-8 (surrogates kept), unpadded."""
    return text.encode("utf-8", "surrogatepass")


def decode_text(data: bytes) -> str:
    """Undo `encode_text`; raise EncodingError."""
    return _text(data)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise EncodingError("plaintext is not UTF-8") from None


# -- tokens: one spelling each -----------------------------------------------------------------

_LEGACY_TOKEN = re.compile(r"v([1-9][0-9]{0,5})\.([A-Za-z0-9_-]+)")


def canonical_spelling(token: str) -> str | None:
    """The one spelling of `token` the masker writes, or None if it is not base64 (nor a legacy token).

    base64 ignores the unused low bits of a token's last character (4 before "==", 2 before "="), so
    one token has up to 16 spellings that all decode, and decrypt, alike; so do surrounding spaces.
    The audit names a token by a hash of its spelling, so only the spelling the masker wrote (what
    is stored) may be unmasked: any other would reveal a value under a name no stored row has.
    Legacy ``v<n>.<base64url>`` tokens likewise (unpadded base64url).
    """
    text = token.strip()
    legacy = _LEGACY_TOKEN.fullmatch(text)
    try:
        if legacy is not None:
            payload = legacy.group(2)
            data = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            return f"v{legacy.group(1)}." + base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
        return base64.b64encode(base64.b64decode(text, validate=True)).decode("ascii")
    except (binascii.Error, ValueError):
        return None
