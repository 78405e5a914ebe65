"""Where the masking keys come from: a variable, a file, or data keys wrapped by AWS KMS.

Every source yields a keyring, ``{version: 64-byte key}`` (the version is the Tink key id);
`config.py` picks the one source that is set. Text forms: one base64 key (version 1),
``version:value`` pairs separated by commas or white space (``1:<b64>,2:<b64>``), or a Tink
JSON keyset of AES-SIV keys (`pii.tink_keyset`), which also names the primary key. A KMS-wrapped
key is the base64 of a KMS ``CiphertextBlob`` (`GenerateDataKey` of 64 bytes); it is decrypted
once at start and its plaintext lives only in memory. Error messages name the source and the version, never a key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

from pii.masking import KEY_BYTES, InvalidKey, MaskingError, decode_key
from pii.tink_keyset import KeysetError, is_keyset, parse_keyset

if TYPE_CHECKING:  # types-boto3-kms (requirements-dev.txt)
    from types_boto3_kms.client import KMSClient
    from types_boto3_kms.type_defs import DecryptRequestTypeDef

_T = TypeVar("_T")

# Bound to every wrapped key (GenerateDataKey and Decrypt): a blob made for another purpose does
# not decrypt here, and CloudTrail records the purpose of each Decrypt.
KMS_ENCRYPTION_CONTEXT = {"purpose": "login-etl-masking-key"}
KMS_HINT = "make a new one with `python main.py keygen --kms-key-id ID`"
MAX_KEY_FILE_BYTES = 64 * 1024  # a keyring of hundreds of versions; anything larger is the wrong file
_PAIR = re.compile(r"^([1-9][0-9]{0,5}):(.+)$")
# KMS error codes that mean "try again later", not "this key or blob is wrong".
_KMS_TRANSIENT = {
    "ThrottlingException",
    "KMSInternalException",
    "DependencyTimeoutException",
    "InternalFailure",
    "ServiceUnavailable",
    "InternalError",
}
_KMS_HINTS = {
    "InvalidCiphertextException": "the blob was not made by this KMS (other account or region), "
    "was made for another purpose, or is damaged",
    "AccessDeniedException": "these credentials may not use the KMS key that wrapped it, or it was "
    "wrapped by another key than MASKING_KEY_KMS_KEY_ID",
    "IncorrectKeyException": "it was wrapped by another key than MASKING_KEY_KMS_KEY_ID",
    "NotFoundException": "the KMS key does not exist (deleted, or another account or region)",
    "DisabledException": "the KMS key is disabled",
    "KMSInvalidStateException": "the KMS key is disabled or pending deletion",
}


class KeySourceError(MaskingError):
    """Raised when a key source cannot yield its keys (bad file, KMS refusal); the text says what to do."""


class KmsUnavailable(KeySourceError):
    """Raised when KMS cannot be reached or keeps failing; retry later."""


class KeySource(Protocol):
    """Something that yields the keyring: the versions are known before the keys are loaded."""

    @property
    def origin(self) -> str:
        """Where the keys come from, in words: the variable (and the file) named, never a key."""
        ...

    @property
    def versions(self) -> tuple[int, ...]: ...

    @property
    def primary(self) -> int | None:
        """The version a keyset names as primary; None when the source does not say."""
        ...

    def load(self) -> dict[int, bytes]: ...


def parse_pairs(text: str) -> dict[int, str]:
    """Split ``version:value`` pairs; raise InvalidKey (the message names versions, never values)."""
    pairs: dict[int, str] = {}
    for position, item in enumerate(re.split(r"[,\s]+", text.strip()), start=1):
        match = _PAIR.match(item)
        if match is None:
            raise InvalidKey(f"entry {position} is not 'version:base64' (version a positive integer)")
        version = int(match.group(1))
        if version in pairs:
            raise InvalidKey(f"version {version} appears twice")
        pairs[version] = match.group(2)
    return pairs


def decode_keyring(text: str) -> dict[int, bytes]:
    """Decode one base64 key (version 1) or ``version:key`` pairs; raise InvalidKey."""
    if ":" not in text:
        return {1: decode_key(text)}
    keys: dict[int, bytes] = {}
    for version, value in parse_pairs(text).items():
        try:
            keys[version] = decode_key(value)
        except InvalidKey as exc:
            raise InvalidKey(f"version {version}: {exc}") from None
    return keys


def decode_key_text(text: str) -> tuple[dict[int, bytes], int | None]:
    """A keyring and its primary version from any text form (a keyset names one, others None); raise InvalidKey."""
    if is_keyset(text):
        try:
            return parse_keyset(text, key_bytes=KEY_BYTES)
        except KeysetError as exc:
            raise InvalidKey(f"Tink keyset: {exc}") from None
    return decode_keyring(text), None


def decode_wrapped(text: str) -> dict[int, bytes]:
    """Decode one base64 CiphertextBlob (version 1) or ``version:blob`` pairs; raise InvalidKey."""
    pairs = parse_pairs(text) if ":" in text else {1: text.strip()}
    blobs: dict[int, bytes] = {}
    for version, value in pairs.items():
        try:
            blobs[version] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKey(f"version {version}: not valid base64") from None
    return blobs


def read_key_file(path: str) -> tuple[dict[int, bytes], int | None]:
    """The keyring in a file (same text forms) and its primary version, read once and checked on the open descriptor.

    The path is opened once; type, owner and mode are then checked with ``fstat`` on that
    descriptor and the text is read from it, so the file checked is the file read (no window
    between a check by path and the open). Symbolic links are followed, because Kubernetes mounts
    secrets as links into a timestamped directory; the checks apply to the file reached. The owner
    rule is PostgreSQL's for its key files (and, for the first case, ssh's and ``.pgpass``'s):

    - owned by the user this process runs as: no access for group or others (0600, 0400);
    - owned by root: not writable by its group, no access for others (0640, 0440), so that a
      Kubernetes secret (root-owned, group = the pod's ``fsGroup``) or a ``root:etl 0440`` file works;
    - owned by anyone else, or not a regular file: refused.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO must not block the start-up
    except OSError as exc:
        raise KeySourceError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        problem = key_file_problem(path, info.st_mode, info.st_uid, os.geteuid())
        if problem is not None:
            raise KeySourceError(f"{path} {problem}")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_KEY_FILE_BYTES:
                raise KeySourceError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a file of keys")
        text = b"".join(chunks).decode("ascii")
    except OSError as exc:
        raise KeySourceError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeySourceError(f"{path} is not a text file of base64 keys") from None
    finally:
        os.close(fd)
    try:
        return decode_key_text(text)
    except InvalidKey as exc:
        raise KeySourceError(f"{path}: {exc}") from None


def key_file_problem(path: str, mode: int, owner: int, euid: int) -> str | None:
    """Why a key file of this type, mode and owner is refused to a process of user `euid`; None if it is not."""
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    permissions = stat.S_IMODE(mode)
    if owner == euid:
        if permissions & (stat.S_IRWXG | stat.S_IRWXO):
            return f"is accessible by group or others (mode {permissions:04o}): run `chmod 600 {path}`"
        return None
    if owner == 0:
        if permissions & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO):
            return (
                f"is owned by root and writable by its group or accessible by others (mode {permissions:04o}): "
                f"run `chmod 440 {path}`"
            )
        return None
    return (
        f"is owned by uid {owner}, neither this process's uid {euid} nor root: run `chown {euid} {path}` "
        '(docs/keys-and-privacy.md, "Key files and secret mounts")'
    )


@dataclass(frozen=True, slots=True)
class StaticKeys:
    """Keys already in memory (from MASKING_KEY, MASKING_KEYS, MASKING_KEYSET or MASKING_KEY_FILE)."""

    origin: str
    keys: Mapping[int, bytes] = field(repr=False)
    primary: int | None = None

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.keys))

    def load(self) -> dict[int, bytes]:
        return dict(self.keys)

    def __repr__(self) -> str:
        return f"StaticKeys({self.origin}, versions={list(self.versions)})"


@dataclass(frozen=True, slots=True)
class KmsWrappedKeys:
    """Data keys wrapped by KMS; `load` decrypts each once (the provider seam: pass `client`)."""

    origin: str
    ciphertexts: Mapping[int, bytes] = field(repr=False)
    region: str
    endpoint_url: str | None = None
    key_id: str | None = None  # if set, Decrypt must use this KMS key and no other
    primary: int | None = None  # wrapped keys name no primary: MASKING_KEY_VERSION does

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.ciphertexts))

    def load(self, client: KMSClient | None = None) -> dict[int, bytes]:
        """Decrypt every wrapped key; raise KeySourceError (refused) or KmsUnavailable (unreachable)."""
        kms = client or kms_client(self.endpoint_url, self.region)
        keys: dict[int, bytes] = {}
        for version, blob in sorted(self.ciphertexts.items()):
            what = f"{self.origin} version {version}"
            request: DecryptRequestTypeDef = {"CiphertextBlob": blob, "EncryptionContext": KMS_ENCRYPTION_CONTEXT}
            if self.key_id:
                request["KeyId"] = self.key_id
            response = _call_kms(what, "decrypt", partial(kms.decrypt, **request))
            plain = response["Plaintext"]
            if len(plain) != KEY_BYTES:
                raise KeySourceError(f"{what}: the data key is {len(plain)} bytes, not {KEY_BYTES}: {KMS_HINT}")
            keys[version] = plain
        return keys

    def __repr__(self) -> str:
        return f"KmsWrappedKeys({self.origin}, versions={list(self.versions)}, region={self.region!r})"


def generate_wrapped_key(
    key_id: str, *, region: str, endpoint_url: str | None = None, client: KMSClient | None = None
) -> str:
    """A new 64-byte data key wrapped by KMS key `key_id`: the base64 CiphertextBlob (no plaintext)."""
    kms = client or kms_client(endpoint_url, region)
    response = _call_kms(
        f"KMS key {key_id}",
        "generate a data key",
        lambda: kms.generate_data_key(KeyId=key_id, NumberOfBytes=KEY_BYTES, EncryptionContext=KMS_ENCRYPTION_CONTEXT),
        todo="check the key id or alias, the region, and kms:GenerateDataKey on the key",
    )
    return base64.b64encode(response["CiphertextBlob"]).decode("ascii")


def kms_client(endpoint_url: str | None, region: str) -> KMSClient:
    """A boto3 KMS client with short timeouts and botocore's standard retries."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})
    client: KMSClient = boto3.client("kms", endpoint_url=endpoint_url, region_name=region, config=config)
    return client


def _call_kms(what: str, action: str, call: Callable[[], _T], todo: str = KMS_HINT) -> _T:
    """Run one KMS call, translating botocore's errors into ours (a refusal or an outage)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    try:
        return call()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _KMS_TRANSIENT or status >= 500:
            raise KmsUnavailable(f"{what}: KMS failed to {action} ({code}); retry later") from None
        hint = _KMS_HINTS.get(code, error.get("Message") or "see the KMS documentation")
        raise KeySourceError(f"{what}: KMS refused to {action} ({code}: {hint}); {todo}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise KeySourceError(
            f"{what}: no AWS credentials for KMS (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or a profile or role)"
        ) from None
    except ParamValidationError as exc:
        raise KeySourceError(f"{what}: invalid KMS request ({exc})") from None
    except BotoCoreError as exc:
        raise KmsUnavailable(f"{what}: KMS unreachable ({type(exc).__name__})") from None
