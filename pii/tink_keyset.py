"""Tink JSON keysets of AES-SIV DeterministicAead keys: read, write, make.

A keyset is what Tink, ``tinkey`` and BigQuery (``KEYS.KEYSET_FROM_JSON``) exchange. Ours holds
keys of type ``type.googleapis.com/google.crypto.tink.AesSivKey`` (64 bytes, AES-256-SIV) with the
``TINK`` output prefix: each ciphertext starts with 0x01 and the 4-byte big-endian key id, so the
key id plays the part of our key version. The key value is the serialized ``AesSivKey`` protobuf
(``version`` = 0, field 1; ``key_value``, field 2), read and written here by hand: two fields do
not justify a protobuf dependency.

Only ENABLED keys are loaded (Tink does the same); DISABLED and DESTROYED ones are skipped. Errors
name the key id, never a key.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Mapping
from typing import Any

from pii.errors import MaskingError

AES_SIV_TYPE_URL = "type.googleapis.com/google.crypto.tink.AesSivKey"
MAX_KEY_ID = 2**32 - 1


class KeysetError(MaskingError, ValueError):
    """Raised when a text is not a Tink JSON keyset of AES-SIV keys we can use; says what is wrong."""


def is_keyset(text: str) -> bool:
    """Whether a key text is a JSON keyset (rather than base64 or `version:key` pairs)."""
    return text.lstrip().startswith("{")


def parse_keyset(text: str, *, key_bytes: int) -> tuple[dict[int, bytes], int]:
    """The enabled keys of a keyset, ``{key_id: key}``, and its primary key id; raise KeysetError."""
    try:
        document = json.loads(text)
    except ValueError:
        raise KeysetError("not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("key"), list):
        raise KeysetError("not a Tink keyset (expected an object with a 'key' list)")
    if "encryptedKeyset" in document:
        raise KeysetError(
            "an encrypted keyset: give the cleartext keyset (a KMS-wrapped key goes in MASKING_KEY_KMS_CIPHERTEXT)"
        )
    primary = document.get("primaryKeyId")
    if not _is_key_id(primary):
        raise KeysetError("primaryKeyId is missing or not a 32-bit unsigned integer")
    keys: dict[int, bytes] = {}
    for position, entry in enumerate(document["key"], start=1):
        if not isinstance(entry, dict) or not _is_key_id(entry.get("keyId")):
            raise KeysetError(f"key {position}: keyId is missing or not a 32-bit unsigned integer")
        key_id: int = entry["keyId"]
        if key_id in keys:
            raise KeysetError(f"key id {key_id} appears twice")
        if entry.get("status") != "ENABLED":
            continue
        keys[key_id] = _key_of(entry, key_id, key_bytes)
    if primary not in keys:
        raise KeysetError(f"the primary key id {primary} is not an enabled key of the keyset")
    return keys, primary


def keyset_json(keys: Mapping[int, bytes], primary: int) -> str:
    """A Tink JSON keyset (cleartext) of `keys`, ``{key_id: 64-byte key}``, with `primary` primary."""
    if primary not in keys:
        raise KeysetError(f"the primary key id {primary} is not in the keyset")
    entries = []
    for key_id, key in sorted(keys.items()):
        value = b"\x12" + _varint(len(key)) + key  # AesSivKey{version: 0 (omitted), key_value: key}
        entries.append(
            {
                "keyData": {
                    "typeUrl": AES_SIV_TYPE_URL,
                    "value": base64.b64encode(value).decode("ascii"),
                    "keyMaterialType": "SYMMETRIC",
                },
                "status": "ENABLED",
                "keyId": key_id,
                "outputPrefixType": "TINK",
            }
        )
    return json.dumps({"primaryKeyId": primary, "key": entries}, indent=2)


def new_keyset(*, key_bytes: int) -> str:
    """A Tink JSON keyset of one new random key, its primary."""
    key_id = new_key_id()
    return keyset_json({key_id: secrets.token_bytes(key_bytes)}, key_id)


def rotated_keyset(keys: Mapping[int, bytes], *, key_bytes: int) -> str:
    """The keyring `keys` as a Tink JSON keyset plus a new random key, made primary (a rotation)."""
    primary = new_key_id(set(keys))
    return keyset_json({**keys, primary: secrets.token_bytes(key_bytes)}, primary)


def new_key_id(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A random 32-bit key id not in `taken` (as Tink picks them), above the range of legacy versions."""
    while True:
        key_id = secrets.randbelow(MAX_KEY_ID - 1_000_000) + 1_000_000
        if key_id not in taken:
            return key_id


def _is_key_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_KEY_ID


def _key_of(entry: dict[str, Any], key_id: int, key_bytes: int) -> bytes:
    data = entry.get("keyData")
    if not isinstance(data, dict) or data.get("typeUrl") != AES_SIV_TYPE_URL:
        raise KeysetError(f"key id {key_id}: not an AES-SIV key (typeUrl must be {AES_SIV_TYPE_URL})")
    if entry.get("outputPrefixType") != "TINK":
        raise KeysetError(
            f"key id {key_id}: output prefix {entry.get('outputPrefixType')!r} is not supported, "
            "only TINK (tokens carry the key id)"
        )
    try:
        value = base64.b64decode(str(data.get("value", "")), validate=True)
    except (binascii.Error, ValueError):
        raise KeysetError(f"key id {key_id}: keyData.value is not valid base64") from None
    key = _aes_siv_key_value(value)
    if key is None or len(key) != key_bytes:
        raise KeysetError(f"key id {key_id}: not an AesSivKey of {key_bytes} bytes (version 0)")
    return key


def _aes_siv_key_value(proto: bytes) -> bytes | None:
    """The key_value of a serialized AesSivKey, or None if it is not one (or has version != 0)."""
    position, key = 0, None
    while position < len(proto):
        tag, position = _read_varint(proto, position)
        if tag is None:
            return None
        if tag == 0x08:  # field 1, varint: version
            version, position = _read_varint(proto, position)
            if version != 0:
                return None
        elif tag == 0x12:  # field 2, length-delimited: key_value
            length, position = _read_varint(proto, position)
            if length is None or position + length > len(proto):
                return None
            key, position = proto[position : position + length], position + length
        else:
            return None
    return key


def _read_varint(data: bytes, position: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, len(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
