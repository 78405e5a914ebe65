"""KMS-wrapped keys through a fake client: errors are translated, plaintext never printed."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, cast

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from pii.keys import KMS_ENCRYPTION_CONTEXT, KeySourceError, KmsUnavailable, KmsWrappedKeys, generate_wrapped_key
from pii.masking import KEY_BYTES

if TYPE_CHECKING:
    from types_boto3_kms.client import KMSClient


class FakeKms:
    """Decrypt returns the blob reversed; failures are raised as botocore would raise them."""

    def __init__(self, error: Exception | None = None, plaintext_bytes: int = KEY_BYTES) -> None:
        self.error = error
        self.size = plaintext_bytes
        self.calls: list[dict[str, object]] = []

    def decrypt(self, **kwargs: object) -> dict[str, bytes]:
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        blob = kwargs["CiphertextBlob"]
        assert isinstance(blob, bytes)
        return {"Plaintext": blob[::-1][: self.size]}

    def generate_data_key(self, **kwargs: object) -> dict[str, bytes]:
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        return {"Plaintext": b"p" * KEY_BYTES, "CiphertextBlob": b"wrapped"}

    @property
    def client(self) -> KMSClient:
        """This fake where a boto3 KMS client is expected (it has the two methods the code calls)."""
        return cast("KMSClient", self)


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Decrypt"
    )


SOURCE = KmsWrappedKeys(
    "MASKING_KEY_KMS_CIPHERTEXT",
    {1: bytes(range(64)), 2: bytes(range(64, 128))},
    region="us-east-1",
    key_id="alias/etl",
)


def test_every_wrapped_key_is_decrypted_once_with_the_purpose_and_the_pinned_key() -> None:
    fake = FakeKms()
    assert SOURCE.load(fake.client) == {1: bytes(reversed(range(64))), 2: bytes(reversed(range(64, 128)))}
    assert [call["EncryptionContext"] for call in fake.calls] == [KMS_ENCRYPTION_CONTEXT] * 2
    assert {call["KeyId"] for call in fake.calls} == {"alias/etl"}


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ("InvalidCiphertextException", "not made by this KMS"),
        ("AccessDeniedException", "may not use the KMS key"),
        ("NotFoundException", "does not exist"),
        ("KMSInvalidStateException", "pending deletion"),
    ],
)
def test_a_kms_refusal_names_the_variable_the_version_and_what_to_do(code: str, hint: str) -> None:
    with pytest.raises(
        KeySourceError, match=f"MASKING_KEY_KMS_CIPHERTEXT version 1: KMS refused.*{code}.*{hint}.*keygen --kms-key-id"
    ) as info:
        SOURCE.load(FakeKms(client_error(code)).client)
    assert not isinstance(info.value, KmsUnavailable)


@pytest.mark.parametrize(
    "error",
    [
        EndpointConnectionError(endpoint_url="http://kms:1"),
        client_error("KMSInternalException", 500),
        client_error("Oops", 503),
    ],
)
def test_kms_out_of_reach_or_failing_is_told_apart_from_a_refusal(error: Exception) -> None:
    with pytest.raises(KmsUnavailable):
        SOURCE.load(FakeKms(error).client)


def test_missing_credentials_say_which_variables_to_set() -> None:
    with pytest.raises(KeySourceError, match="no AWS credentials"):
        SOURCE.load(FakeKms(NoCredentialsError()).client)


def test_a_data_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(KeySourceError, match="32 bytes, not 64"):
        SOURCE.load(FakeKms(plaintext_bytes=32).client)


def test_a_new_wrapped_key_is_the_ciphertext_only() -> None:
    fake = FakeKms()
    wrapped = generate_wrapped_key("alias/etl", region="us-east-1", client=fake.client)
    assert wrapped == base64.b64encode(b"wrapped").decode()
    assert fake.calls == [{"KeyId": "alias/etl", "NumberOfBytes": 64, "EncryptionContext": KMS_ENCRYPTION_CONTEXT}]


def test_a_new_wrapped_key_for_a_missing_kms_key_is_a_refusal() -> None:
    with pytest.raises(KeySourceError, match="KMS key alias/nope: KMS refused to generate a data key"):
        generate_wrapped_key("alias/nope", region="us-east-1", client=FakeKms(client_error("NotFoundException")).client)
