"""KMS-wrapped masking keys against a KMS emulator over HTTP (moto; scripts/stack.sh starts it).

TEST_KMS_ENDPOINT (default http://127.0.0.1:4599) chooses it; absent, these tests skip locally and
fail under CI=true.
"""

from __future__ import annotations

import base64
import os

import pytest

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE
from helpers import TEST_KMS_ENDPOINT, emulator_client, login, query, queue_counts, send, unavailable
from main import main
from pii.keys import KMS_ENCRYPTION_CONTEXT
from pii.masking import Masker, generate_key, token_version


def kms_for(region: str):
    return emulator_client("kms", TEST_KMS_ENDPOINT, region)


@pytest.fixture(scope="module")
def kms():
    client = kms_for("us-east-1")
    try:
        client.list_keys(Limit=1)
    except Exception as exc:  # noqa: BLE001 - any failure means: no emulator
        unavailable(f"KMS emulator at {TEST_KMS_ENDPOINT} ({type(exc).__name__})")
    return client


@pytest.fixture
def kms_key(kms) -> str:
    return kms.create_key(Description="login-etl test")["KeyMetadata"]["KeyId"]


@pytest.fixture
def kms_env(etl_env, monkeypatch):
    """etl_env with KMS at the emulator (SQS stays where it is) and no plain key."""
    monkeypatch.delenv("MASKING_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", TEST_KMS_ENDPOINT)
    return etl_env


def keygen(capsys, key_id: str) -> str:
    capsys.readouterr()
    assert main(["keygen", "--kms-key-id", key_id]) == EXIT_OK
    return capsys.readouterr().out.strip()


def test_keygen_prints_a_wrapped_data_key_that_only_kms_opens(kms_env, kms, kms_key, capsys) -> None:
    blob = base64.b64decode(keygen(capsys, kms_key), validate=True)
    plain = kms.decrypt(CiphertextBlob=blob, EncryptionContext=KMS_ENCRYPTION_CONTEXT)["Plaintext"]
    assert len(plain) == 64 and plain not in blob


def test_the_etl_starts_with_a_kms_wrapped_key_and_its_tokens_unmask(
    kms_env, kms, kms_key, sqs_client, monkeypatch, capsys
) -> None:
    # GIVEN a KMS-wrapped key as the only key source
    wrapped = keygen(capsys, kms_key)
    monkeypatch.setenv("MASKING_KEY_KMS_CIPHERTEXT", wrapped)
    send(sqs_client, kms_env["SQS_QUEUE_URL"], [login(1, ip="198.51.100.7", device_id="123-45-6789")])
    # WHEN the ETL runs
    assert main([]) == EXIT_OK
    # THEN the rows are masked under the data key KMS holds, and unmask (also via KMS) reverses them
    [(masked_ip,)] = query(kms_env["DATABASE_URL"], "SELECT masked_ip FROM user_logins")
    plain = kms.decrypt(CiphertextBlob=base64.b64decode(wrapped), EncryptionContext=KMS_ENCRYPTION_CONTEXT)
    assert Masker(plain["Plaintext"]).unmask(masked_ip) == "198.51.100.7"
    capsys.readouterr()
    assert main(["unmask", "--reason", "kms test", masked_ip]) == EXIT_OK
    assert capsys.readouterr().out.strip() == "198.51.100.7"


def test_a_keyring_of_two_wrapped_keys_masks_with_the_active_one(
    kms_env, kms_key, sqs_client, monkeypatch, capsys
) -> None:
    first, second = keygen(capsys, kms_key), keygen(capsys, kms_key)
    monkeypatch.setenv("MASKING_KEY_KMS_CIPHERTEXT", f"1:{first},2:{second}")
    monkeypatch.setenv("MASKING_KEY_VERSION", "2")
    send(sqs_client, kms_env["SQS_QUEUE_URL"], [login(2)])
    assert main([]) == EXIT_OK
    [(masked_ip, masked_device_id)] = query(
        kms_env["DATABASE_URL"], "SELECT masked_ip, masked_device_id FROM user_logins"
    )
    assert (token_version(masked_ip), token_version(masked_device_id)) == (2, 2)


@pytest.mark.parametrize("case", ["another region", "damaged blob", "another pinned key"])
def test_a_wrapped_key_kms_refuses_is_a_clear_error_and_nothing_is_consumed(
    kms_env, kms, kms_key, sqs_client, monkeypatch, capsys, case
) -> None:
    # GIVEN a wrapped key that this KMS will not open
    if case == "another region":  # its KMS key does not exist where we look for it
        other = kms_for("eu-west-1")
        wrapped = base64.b64encode(
            other.generate_data_key(
                KeyId=other.create_key()["KeyMetadata"]["KeyId"],
                NumberOfBytes=64,
                EncryptionContext=KMS_ENCRYPTION_CONTEXT,
            )["CiphertextBlob"]
        ).decode()
    elif case == "damaged blob":
        wrapped = base64.b64encode(os.urandom(150)).decode()
    else:
        wrapped = keygen(capsys, kms_key)
        monkeypatch.setenv("MASKING_KEY_KMS_KEY_ID", kms.create_key()["KeyMetadata"]["KeyId"])
    monkeypatch.setenv("MASKING_KEY_KMS_CIPHERTEXT", wrapped)
    send(sqs_client, kms_env["SQS_QUEUE_URL"], [login(n) for n in range(3)])
    capsys.readouterr()
    # WHEN the ETL starts
    assert main([]) == EXIT_CONFIG
    # THEN one clear line, no traceback, nothing consumed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASKING_KEY_KMS_CIPHERTEXT version 1: KMS refused to decrypt" in err[0]
    assert "keygen --kms-key-id" in err[0]
    assert queue_counts(sqs_client, kms_env["SQS_QUEUE_URL"]) == (3, 0)


def test_check_exits_2_when_kms_refuses_the_wrapped_key_and_3_when_kms_is_out_of_reach(
    kms_env,
    kms,
    kms_key,
    monkeypatch,
    capsys,
) -> None:
    # A refusal is a configuration error (exit 2, as for the ETL itself); an outage is a service's.
    monkeypatch.setenv("MASKING_KEY_KMS_CIPHERTEXT", keygen(capsys, kms_key))
    monkeypatch.setenv("MASKING_KEY_KMS_KEY_ID", kms.create_key()["KeyMetadata"]["KeyId"])
    assert main(["check"]) == EXIT_CONFIG
    assert "✗ masking keys: MASKING_KEY_KMS_CIPHERTEXT version 1: KMS refused" in capsys.readouterr().out
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:1")
    assert main(["check"]) == EXIT_UNREACHABLE
    assert "KMS unreachable" in capsys.readouterr().out


def test_an_unreachable_kms_exits_3_and_nothing_is_consumed(kms_env, sqs_client, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:1")
    monkeypatch.setenv("MASKING_KEY_KMS_CIPHERTEXT", base64.b64encode(b"x" * 150).decode())
    send(sqs_client, kms_env["SQS_QUEUE_URL"], [login(1)])
    assert main([]) == EXIT_UNREACHABLE
    assert "KMS unreachable" in capsys.readouterr().err
    assert queue_counts(sqs_client, kms_env["SQS_QUEUE_URL"]) == (1, 0)


def test_keygen_for_a_missing_kms_key_exits_2_naming_it(kms_env, kms, capsys) -> None:
    assert main(["keygen", "--kms-key-id", "alias/no-such-key"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "KMS key alias/no-such-key: KMS refused" in err and "NotFoundException" in err


def test_a_plain_key_and_a_wrapped_key_together_are_refused(kms_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MASKING_KEY", generate_key())
    monkeypatch.setenv("MASKING_KEY_KMS_CIPHERTEXT", base64.b64encode(b"x" * 150).decode())
    assert main([]) == EXIT_CONFIG
    assert "MASKING_KEY, MASKING_KEY_KMS_CIPHERTEXT" in capsys.readouterr().err
