"""Reversible, deterministic, keyed masking of PII with AES-SIV (RFC 5297), in Tink's format.

Why AES-SIV: it is deterministic by design (the IV is synthesised from the key, the associated
data and the plaintext), so the same value masks to the same token and analysts can still count
duplicates; it is authenticated, so a tampered or foreign token fails to decrypt instead of
yielding garbage; and it is reversible with the key only. A hash would be irreversible and, for
the 2^32 IPv4 addresses or the 10^9 SSN-shaped device ids, brute-forceable in minutes.

The field name is the associated data: an IP and a device id with the same text mask to
different tokens, and a token cannot be replayed as another field.

Beside each IP token, a network token (`mask_network`): the token of the address's network (/24 for
IPv4, IPv4-mapped included; /48 for IPv6) under its own associated data, ``ip_network``, so it can
neither be taken for nor swapped with an IP token. Equal networks, equal tokens; `unmask` gives
the network (``203.0.113.0/24``), never an address. A value that is not an IP address has none (None).

Token format: standard base64 (padded) of exactly what Tink's DeterministicAead (AES-SIV key,
``TINK`` output prefix) gives for ``encrypt_deterministically(plaintext, field)``: the byte 0x01,
the 4-byte big-endian key id, the 16-byte SIV, the ciphertext. So Tink, and BigQuery's
``DETERMINISTIC_DECRYPT_BYTES``, decrypt a token with the keyset (`pii.tink_keyset`). The plaintext
is the field's fixed-length form (`pii.encoding`): every IP token has one length, every device token
of up to 31 bytes another.

A Masker holds a keyring, ``{key id: key}``; new tokens use the primary (active) key id, any key held
unmasks. The key id is the version: a keyring from MASKING_KEY/MASKING_KEYS uses its versions (1, 2,
...) as key ids. Legacy tokens, ``v<version>.<base64url(siv || utf-8 text)>`` (unpadded text, made
before Tink's format), still unmask with the key of that version, and `rekey` rewrites them.
Rotation adds a key, makes it primary, rewrites stored tokens (`rekey`), then retires the old key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from pii import encoding
from pii.errors import MaskingError

KEY_BYTES = 64  # AES-256-SIV: two 256-bit keys (RFC 5297 section 2.2)
FIELDS = ("ip", "device_id")
# Rejected messages are stored with their whole body encrypted under this associated data.
BODY_FIELD = "rejected_body"
# The network token's associated data (a column of its own, `masked_network`; see Masker.mask_network).
NETWORK_FIELD = "ip_network"
# Every field `unmask` and `rekey` try by default, most frequent first.
ALL_FIELDS = (*FIELDS, NETWORK_FIELD, BODY_FIELD)
# Tokens remembered per field by a Masker (see Masker.mask): ~4 MB each at most.
RECENT_TOKENS = 16_384
_LEGACY_TOKEN = re.compile(r"^v([1-9][0-9]{0,5})\.([A-Za-z0-9_-]+)$")
TINK_PREFIX_BYTE = 0x01  # Tink's OutputPrefixType.TINK
PREFIX_BYTES = 5  # the prefix byte and the 4-byte key id
MAX_KEY_ID = 2**32 - 1
# How each field's value becomes the plaintext (and back); other fields are UTF-8 (pii.encoding).
# The key check value: HMAC-SHA256 of a fixed constant under a key derived from the masking key for
# this purpose alone. It tells two keys apart (the database keeps one per version) and reveals
# nothing of the key, nor any token: neither the key nor the derived key encrypts anything else.
_CHECK_DERIVATION_LABEL = b"login-etl key check value: derivation"
_CHECK_CONSTANT = b"login-etl key check value: one version, one key"
CHECK_VALUE_HEX_DIGITS = 32

_ENCODE = {"ip": encoding.encode_ip, "device_id": encoding.encode_padded}
_DECODE = {"ip": encoding.decode_ip, "device_id": encoding.decode_padded, NETWORK_FIELD: encoding.decode_network}


class InvalidKey(MaskingError):
    """Raised when a key is not base64 of exactly 64 bytes, or a keyring is inconsistent."""


class UnmaskError(MaskingError, ValueError):
    """Raised when a token is malformed, of a version not held, or fails authentication."""


def generate_key() -> str:
    """Return a new random key, base64-encoded (the form `MASKING_KEY` takes)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def decode_key(text: str) -> bytes:
    """Decode a base64 key and check its length; the error never echoes the key."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("the key is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise InvalidKey(f"the key must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def key_check_value(key: bytes) -> str:
    """The check value of a key (32 hex digits): equal for one key, different for two; never the key."""
    derived = hmac.new(key, _CHECK_DERIVATION_LABEL, hashlib.sha256).digest()
    return hmac.new(derived, _CHECK_CONSTANT, hashlib.sha256).hexdigest()[:CHECK_VALUE_HEX_DIGITS]


def token_version(token: str) -> int:
    """The key id (version) a token was made with; raise UnmaskError if it is not a token."""
    return _parse(token)[0]


def canonical(field: str, value: str) -> str:
    """What `unmask` returns for a token of `value`: the canonical text of an IP, else `value`."""
    return _DECODE.get(field, encoding.decode_text)(_ENCODE.get(field, encoding.encode_text)(value))


def token_prefix(key_id: int) -> bytes:
    """The first 5 bytes of every token of `key_id`: Tink's prefix byte and the big-endian key id."""
    return bytes([TINK_PREFIX_BYTE]) + key_id.to_bytes(4, "big")


def text_prefixes(key_id: int) -> tuple[str, ...]:
    """The 7-character beginnings a token of `key_id` can have (its text starts with one of them).

    Seven base64 characters hold 42 bits: the 40 of the prefix and the top 2 of the SIV, hence four.
    A SQL filter can test them without decoding (`rekey`).
    """
    prefix = token_prefix(key_id)
    return tuple(sorted({base64.b64encode(prefix + bytes([top])).decode()[:7] for top in (0, 0x40, 0x80, 0xC0)}))


class Masker:
    """Masks and unmasks field values with a keyring of AES-SIV keys (one cipher object per key).

    `Masker(key, version=n)` holds one key; `Masker.from_keys({1: k1, 2: k2}, active=2)` a keyring.
    """

    def __init__(self, key: bytes, *, version: int = 1) -> None:
        self._ciphers: dict[int, AESSIV] = {}
        self._checks: dict[int, str] = {}
        self._add(version, key)
        self.version = version
        self._cipher = self._ciphers[version]
        # The tokens of the values of FIELDS masked lately, per field (tokens are deterministic, so
        # a remembered one is the one encryption would give). The values are raw PII, kept only in
        # this process's memory, as the messages being processed are; never the rejected bodies.
        self._recent: dict[str, dict[str, str]] = {name: {} for name in FIELDS}
        # The same for `mask_ip`: the IP's text -> its token and its network token; and the network
        # tokens by network plaintext (no address in it, only the network).
        self._recent_ips: dict[str, tuple[str, str | None]] = {}
        self._recent_networks: dict[bytes, str] = {}
        self._prefix = token_prefix(version)
        self.current_prefixes = text_prefixes(version)

    @classmethod
    def from_keys(cls, keys: Mapping[int, bytes], *, active: int) -> Masker:
        """A keyring: `keys` maps key ids (versions) to 64-byte keys; new tokens use key id `active`."""
        if active not in keys:
            held = ", ".join(map(str, sorted(keys))) or "none"
            raise InvalidKey(f"the active key version {active} is not in the keyring (it holds {held})")
        masker = cls(keys[active], version=active)
        seen = {keys[active]: active}
        for version, key in sorted(keys.items()):
            if version == active:
                continue
            if key in seen:  # one key under two versions would make rotation a no-op
                first, second = sorted((seen[key], version))
                raise InvalidKey(f"key versions {first} and {second} hold the same key")
            seen[key] = version
            masker._add(version, key)
        return masker

    def _add(self, version: int, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise InvalidKey(f"the key of version {version} must be {KEY_BYTES} bytes, got {len(key)}")
        if not 0 <= version <= MAX_KEY_ID:
            raise ValueError(f"a key id must be between 0 and {MAX_KEY_ID}")
        self._ciphers[version] = AESSIV(key)
        self._checks[version] = key_check_value(key)

    @property
    def versions(self) -> tuple[int, ...]:
        """The key ids (versions) held, ascending."""
        return tuple(sorted(self._ciphers))

    @property
    def check_values(self) -> dict[int, str]:
        """``{version: key check value}`` of every key held (what the database records per version)."""
        return dict(self._checks)

    def __repr__(self) -> str:
        if len(self._ciphers) == 1:
            return f"Masker(version={self.version})"  # never the key
        return f"Masker(version={self.version}, versions={list(self.versions)})"

    def mask(self, field: str, value: str) -> str:
        """Return the token of `value` as `field` under the active key: same input and key, same token."""
        # The hot path of the ETL (twice per message): a value seen lately is one dict lookup (a
        # device or an IP logs in again and again); otherwise one encode, one encrypt, one base64.
        recent = self._recent.get(field)
        if recent is not None:
            token = recent.get(value)
            if token is not None:
                return token
        plain = _ENCODE.get(field, encoding.encode_text)(value)
        sealed = self._cipher.encrypt(plain, _associated_data(field))
        token = binascii.b2a_base64(self._prefix + sealed, newline=False).decode("ascii")
        if recent is not None:
            if len(recent) >= RECENT_TOKENS:
                recent.clear()  # cheaper than an LRU, and as good for a stream's heavy hitters
            recent[value] = token
        return token

    def mask_network(self, ip: str) -> str | None:
        """The network token of an IP address under the active key (see the module docstring); None
        if `ip` is not an IP address (what the `ip` token stores in its padded text form)."""
        plain = encoding.encode_network(ip)
        return None if plain is None else self._network_token(plain)

    def mask_ip(self, ip: str) -> tuple[str, str | None]:
        """`(mask("ip", ip), mask_network(ip))`, the address parsed once: the ETL's hot path."""
        recent = self._recent_ips
        found = recent.get(ip)
        if found is not None:
            return found
        address = encoding.encode_ip(ip)
        cipher, prefix = self._cipher, self._prefix
        token = binascii.b2a_base64(prefix + cipher.encrypt(address, _IP_AD), newline=False).decode("ascii")
        network = None
        if len(address) == encoding.IP_BYTES:
            plain = encoding.network_of(address)
            networks = self._recent_networks
            network = networks.get(plain)
            if network is None:
                sealed = cipher.encrypt(plain, _NETWORK_AD)
                network = binascii.b2a_base64(prefix + sealed, newline=False).decode("ascii")
                if len(networks) >= RECENT_TOKENS:
                    networks.clear()
                networks[plain] = network
        if len(recent) >= RECENT_TOKENS:
            recent.clear()
        pair = recent[ip] = (token, network)
        return pair

    def _network_token(self, plain: bytes) -> str:
        # Keyed by the network: its addresses, seen one by one, share one encryption.
        recent = self._recent_networks
        token = recent.get(plain)
        if token is None:
            token = self._seal(NETWORK_FIELD, plain)
            if len(recent) >= RECENT_TOKENS:
                recent.clear()
            recent[plain] = token
        return token

    def network_of_token(self, ip_token: str) -> str | None:
        """The network token (active key) of the address an `ip` token holds; None if it holds no
        address. Raises UnmaskError if `ip_token` is not an ip token this keyring opens."""
        return self.mask_network(self._open(ip_token, ("ip",))[1])

    def _seal(self, field: str, plain: bytes) -> str:
        sealed = self._cipher.encrypt(plain, _associated_data(field))
        return binascii.b2a_base64(self._prefix + sealed, newline=False).decode("ascii")

    def unmask(self, token: str, fields: tuple[str, ...] = ALL_FIELDS) -> str:
        """Return the original value of a token of any of `fields` (an IP in canonical text); raise UnmaskError."""
        return self._open(token, fields)[1]

    def is_current(self, token: str) -> bool:
        """Whether `token` is already of the active key and format (what `rekey` leaves alone)."""
        return token.startswith(self.current_prefixes) and _parse(token)[0] == self.version

    def rekey(self, token: str, fields: tuple[str, ...] = ALL_FIELDS) -> str:
        """Return `token` re-made under the active key (the same token if it already is); raise UnmaskError.

        The field is recovered from the token itself (the one whose associated data authenticates),
        so a rewritten token is exactly what `mask(field, value)` gives today: duplicates line up,
        and a legacy token's IP is canonicalised on the way.
        """
        if self.is_current(token):
            return token
        field, value = self._open(token, fields)
        if field == NETWORK_FIELD:  # its value is the network's text, not an address: seal its plaintext again
            return self._seal(field, self._plaintext(token, field))
        return self.mask(field, value)

    def _plaintext(self, token: str, field: str) -> bytes:
        version, sealed, _legacy = _parse(token)
        return self._ciphers[version].decrypt(sealed, _associated_data(field))

    def _open(self, token: str, fields: tuple[str, ...]) -> tuple[str, str]:
        version, sealed, legacy = _parse(token)
        cipher = self._ciphers.get(version)
        if cipher is None:
            held = ", ".join(map(str, self.versions))
            raise UnmaskError(
                f"token is of key version {version}, which this keyring does not hold (it holds {held}): "
                f"add the key of version {version} to unmask it"
            )
        for field in fields:
            try:
                plain = cipher.decrypt(sealed, _associated_data(field))
            except InvalidTag:
                continue
            decode = encoding.decode_text if legacy else _DECODE.get(field, encoding.decode_text)
            try:
                return field, decode(plain)
            except encoding.EncodingError as exc:  # authentic, so made with our key by other code
                raise UnmaskError(f"token decrypts as {field}, but {exc} (see docs/tink-tokens.md)") from None
        raise UnmaskError("token does not decrypt under this key (wrong key, or tampered)")


@functools.cache
def _associated_data(field: str) -> list[bytes]:
    """The AES-SIV associated data of a field (a list the cipher reads and never changes)."""
    return [field.encode()]


_IP_AD = _associated_data("ip")
_NETWORK_AD = _associated_data(NETWORK_FIELD)


def _parse(token: str) -> tuple[int, bytes, bool]:
    """(key id, SIV and ciphertext, whether it is a legacy `v<n>.` token); raise UnmaskError."""
    token = token.strip()
    if token.startswith("v"):
        match = _LEGACY_TOKEN.match(token)
        if match is None:
            raise UnmaskError("not a masked token (expected base64, or a legacy 'v<version>.<base64url>')")
        payload = match.group(2)
        try:
            sealed = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (binascii.Error, ValueError):
            raise UnmaskError("token payload is not valid base64url") from None
        return int(match.group(1)), sealed, True
    try:
        data = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        raise UnmaskError("not a masked token (expected base64, or a legacy 'v<version>.<base64url>')") from None
    if len(data) < PREFIX_BYTES + 16 or data[0] != TINK_PREFIX_BYTE:
        raise UnmaskError("not a masked token (too short, or not Tink's prefix 0x01)")
    return int.from_bytes(data[1:PREFIX_BYTES], "big"), data[PREFIX_BYTES:], False
