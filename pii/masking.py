"""Reversible, deterministic, keyed masking of PII with AES-SIV (RFC 5297).

Why AES-SIV: it is deterministic by design (the IV is synthesised from the key, the associated
data and the plaintext), so the same value masks to the same token and analysts can still count
duplicates; it is authenticated, so a tampered or foreign token fails to decrypt instead of
yielding garbage; and it is reversible with the key only. A hash would be irreversible and, for
the 2^32 IPv4 addresses or the 10^9 SSN-shaped device ids, brute-forceable in minutes.

The field name is the associated data: an IP and a device id with the same text mask to
different tokens, and a token cannot be replayed as another field.

Token format: ``v<version>.<base64url(siv_tag || ciphertext), unpadded>``.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

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
    """Raised when a key is not base64 of exactly 64 bytes."""


class UnmaskError(MaskingError):
    """Raised when a token is malformed, of an unknown version, or fails authentication."""


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


class Masker:
    """Masks and unmasks field values with one AES-SIV key (one cipher object, reused)."""

    def __init__(self, key: bytes, *, version: int = 1) -> None:
        if len(key) != KEY_BYTES:
            raise InvalidKey(f"the key must be {KEY_BYTES} bytes, got {len(key)}")
        if version < 1:
            raise ValueError("version must be >= 1")
        self._cipher = AESSIV(key)
        self.version = version
        self._prefix = f"v{version}."

    def __repr__(self) -> str:
        return f"Masker(version={self.version})"  # never the key

    def mask(self, field: str, value: str) -> str:
        """Return the token of `value` as `field`: same input and key, same token."""
        sealed = self._cipher.encrypt(value.encode("utf-8", "surrogatepass"), [field.encode()])
        return self._prefix + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def unmask(self, token: str, fields: tuple[str, ...] = (*FIELDS, BODY_FIELD)) -> str:
        """Return the original value of a token of any of `fields`; raise UnmaskError."""
        match = _TOKEN.match(token.strip())
        if match is None:
            raise UnmaskError("not a masked token (expected 'v<version>.<base64url>')")
        version = int(match.group(1))
        if version != self.version:
            raise UnmaskError(f"token is of key version {version}; this key is version {self.version}")
        payload = match.group(2)
        try:
            sealed = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (binascii.Error, ValueError):
            raise UnmaskError("token payload is not valid base64url") from None
        for field in fields:
            try:
                plain = self._cipher.decrypt(sealed, [field.encode()])
            except InvalidTag:
                continue
            return plain.decode("utf-8", "surrogatepass")
        raise UnmaskError("token does not decrypt under this key (wrong key, or tampered)")
