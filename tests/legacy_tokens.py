"""Tokens of the legacy format (``v<version>.`` + base64url(AES-SIV of the UTF-8 text)), as the ETL
made them before Tink's format: the code no longer makes them, the tests need them to prove that
they still unmask and that `rekey` migrates them."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.ciphers.aead import AESSIV


def legacy_token(key: bytes, version: int, field: str, value: str) -> str:
    """The token the ETL made for `value` as `field` with key `version`, before Tink's format."""
    sealed = AESSIV(key).encrypt(value.encode("utf-8", "surrogatepass"), [field.encode()])
    return f"v{version}." + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
