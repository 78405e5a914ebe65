"""Reversible, deterministic, keyed masking of PII with AES-SIV (RFC 5297).

Why AES-SIV: it is deterministic by design (the IV is synthesised from the key, the associated
data and the plaintext), so the same value masks to the same token and analysts can still count
duplicates; it is authenticated, so a tampered or foreign token fails to decrypt instead of
yielding garbage; and it is reversible with the key only. A hash would be irreversible and, for
the 2^32 IPv4 addresses or the 10^9 SSN-shaped device ids, brute-forceable in minutes.

The field name is the associated data: an IP and a device id with the same text mask to
different tokens, and a token cannot be replayed as another field.

Token format: ``v<version>.<base64url(siv_tag || ciphertext), unpadded>``. A Masker holds a
keyring: one key per version. New tokens use the active version; any version held unmasks. Rotation
adds a version, makes it active, rewrites stored tokens (`rekey`), then retires the old key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

KEY_BYTES = 64  # AES-256-SIV: two 256-bit keys (RFC 5297 section 2.2)
FIELDS = ("ip", "device_id")
# Rejected messages are stored with their whole body encrypted under this associated data.
BODY_FIELD = "rejected_body"
_TOKEN = re.compile(r"^v([1-9][0-9]{0,5})\.([A-Za-z0-9_-]+)$")


class MaskingError(Exception):
    """Root of the errors raised by this package."""


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


def token_version(token: str) -> int:
    """The key version a token was made with; raise UnmaskError if it is not a token."""
    return _parse(token)[0]


class Masker:
    """Masks and unmasks field values with a keyring of AES-SIV keys (one cipher object per key).

    `Masker(key, version=n)` holds one key; `Masker.from_keys({1: k1, 2: k2}, active=2)` a keyring.
    """

    def __init__(self, key: bytes, *, version: int = 1) -> None:
        self._ciphers: dict[int, AESSIV] = {}
        self._add(version, key)
        self.version = version
        self._prefix = f"v{version}."

    @classmethod
    def from_keys(cls, keys: Mapping[int, bytes], *, active: int) -> Masker:
        """A keyring: `keys` maps versions to 64-byte keys; new tokens use version `active`."""
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
        if version < 1:
            raise ValueError("version must be >= 1")
        self._ciphers[version] = AESSIV(key)

    @property
    def versions(self) -> tuple[int, ...]:
        """The key versions held, ascending."""
        return tuple(sorted(self._ciphers))

    def __repr__(self) -> str:
        if len(self._ciphers) == 1:
            return f"Masker(version={self.version})"  # never the key
        return f"Masker(version={self.version}, versions={list(self.versions)})"

    def mask(self, field: str, value: str) -> str:
        """Return the token of `value` as `field` under the active key: same input and key, same token."""
        return self._seal(self.version, field, value)

    def unmask(self, token: str, fields: tuple[str, ...] = (*FIELDS, BODY_FIELD)) -> str:
        """Return the original value of a token of any of `fields`; raise UnmaskError."""
        return self._open(token, fields)[1]

    def rekey(self, token: str, fields: tuple[str, ...] = (*FIELDS, BODY_FIELD)) -> str:
        """Return `token` re-made under the active key (the same token if it already is); raise UnmaskError.

        The field is recovered from the token itself (the one whose associated data authenticates),
        so a rewritten token is exactly what `mask(field, value)` gives today: duplicates line up.
        """
        if token.startswith(self._prefix):
            return token
        field, value = self._open(token, fields)
        return self._seal(self.version, field, value)

    def _seal(self, version: int, field: str, value: str) -> str:
        # The hot path of the ETL (twice per message): the associated data is built once per field,
        # and base64url is base64 with two letters swapped.
        sealed = self._ciphers[version].encrypt(value.encode("utf-8", "surrogatepass"), _associated_data(field))
        encoded = binascii.b2a_base64(sealed, newline=False).rstrip(b"=").translate(_BASE64_TO_URLSAFE)
        return f"v{version}." + encoded.decode("ascii")

    def _open(self, token: str, fields: tuple[str, ...]) -> tuple[str, str]:
        version, sealed = _parse(token)
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
            return field, plain.decode("utf-8", "surrogatepass")
        raise UnmaskError("token does not decrypt under this key (wrong key, or tampered)")


_BASE64_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


@functools.cache
def _associated_data(field: str) -> list[bytes]:
    """The AES-SIV associated data of a field (a list the cipher reads and never changes)."""
    return [field.encode()]


def _parse(token: str) -> tuple[int, bytes]:
    match = _TOKEN.match(token.strip())
    if match is None:
        raise UnmaskError("not a masked token (expected 'v<version>.<base64url>')")
    payload = match.group(2)
    try:
        sealed = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        raise UnmaskError("token payload is not valid base64url") from None
    return int(match.group(1)), sealed
