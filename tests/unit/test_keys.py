"""Key sources, keyrings and rotation: which variables, which versions, which errors."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import KEY_SOURCES, ConfigError, KmsSettings, Settings
from database.audit import UnmaskAudit, token_fingerprint
from pii.keys import KmsWrappedKeys, StaticKeys
from pii.masking import InvalidKey, Masker, UnmaskError, canonical, decode_key, generate_key, token_version
from tests.legacy_tokens import legacy_token

K1, K2, K3 = generate_key(), generate_key(), generate_key()
KEYRING = Masker.from_keys({1: decode_key(K1), 2: decode_key(K2)}, active=2)


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "masking.key"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


# -- choosing the source ------------------------------------------------------------------------


def test_no_key_source_names_every_variable_and_how_to_make_a_key() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    assert all(name in str(info.value) for name in KEY_SOURCES) and "keygen" in str(info.value)


def test_two_key_sources_at_once_are_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"several key sources are set \(MASKING_KEY, MASKING_KEYS\)"):
        Settings.from_env({"MASKING_KEY": K1, "MASKING_KEYS": f"1:{K1}"})


def test_masking_key_is_the_one_key_shorthand_for_version_1() -> None:
    settings = Settings.from_env({"MASKING_KEY": K1})
    assert settings.key_version == 1 and settings.key_source.load() == {1: decode_key(K1)}


def test_a_keyring_of_two_versions_needs_the_active_version_named() -> None:
    with pytest.raises(ConfigError, match="MASKING_KEY_VERSION is not set.*1, 2"):
        Settings.from_env({"MASKING_KEYS": f"1:{K1},2:{K2}"})
    settings = Settings.from_env({"MASKING_KEYS": f"1:{K1}, 2:{K2}", "MASKING_KEY_VERSION": "2"})
    assert settings.key_version == 2 and settings.key_source.versions == (1, 2)


@pytest.mark.parametrize("version", ["3", "0", "two"])
def test_an_active_version_outside_the_keyring_is_refused(version: str) -> None:
    with pytest.raises(ConfigError, match="MASKING_KEY_VERSION"):
        Settings.from_env({"MASKING_KEYS": f"1:{K1},2:{K2}", "MASKING_KEY_VERSION": version})


@pytest.mark.parametrize(
    "text",
    [f"1:{K1},1:{K2}", f"x:{K1}", f"1:{K1},2:c2VjcmV0", f"1:{K1};2:{K2}"],
    ids=["version-twice", "version-not-a-number", "key-too-short", "semicolon"],
)
def test_a_malformed_keyring_is_refused_without_echoing_a_key(text: str) -> None:
    with pytest.raises(ConfigError, match="MASKING_KEYS is malformed") as info:
        Settings.from_env({"MASKING_KEYS": text})
    assert K1 not in str(info.value) and K2 not in str(info.value) and "c2VjcmV0" not in str(info.value)


def test_the_repr_of_settings_names_the_source_and_versions_but_no_key() -> None:
    text = repr(Settings.from_env({"MASKING_KEYS": f"1:{K1}\n2:{K2}", "MASKING_KEY_VERSION": "1"}))
    assert "MASKING_KEYS" in text and "versions=[1, 2]" in text and K1 not in text and K2 not in text


def test_a_key_file_of_mode_600_is_read_in_either_form(tmp_path: Path) -> None:
    assert Settings.from_env({"MASKING_KEY_FILE": key_file(tmp_path, K1 + "\n")}).key_source.load()[1] == decode_key(K1)
    settings = Settings.from_env(
        {"MASKING_KEY_FILE": key_file(tmp_path, f"1:{K1}\n2:{K2}\n"), "MASKING_KEY_VERSION": "2"}
    )
    assert settings.key_source.versions == (1, 2)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_key_file_that_group_or_others_may_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, K1, mode)
    with pytest.raises(ConfigError, match=f"accessible by group or others.*chmod 600 {path}"):
        Settings.from_env({"MASKING_KEY_FILE": path})


def test_a_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MASKING_KEY_FILE: cannot read"):
        Settings.from_env({"MASKING_KEY_FILE": str(tmp_path / "nope")})


IMAGE_UID = 10001  # the Dockerfile's USER


@pytest.fixture
def root() -> None:
    """These tests chown files to other users: skipped without root locally, failed under CI=true
    (CI runs as root: a skip there would hide that they never ran)."""
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("needs root to chown files to other users, and CI=true does not skip")
        pytest.skip("needs root to chown files to other users")


needs_root = pytest.mark.usefixtures("root")


def test_key_file_checks_are_made_on_the_opened_descriptor_not_on_the_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a good key file, and any look-up by path other than the one open refused
    path = key_file(tmp_path, K1)
    opened: list[str] = []
    real_open = os.open

    def open_once(name: str, flags: int, *args: int) -> int:
        opened.append(name)
        return real_open(name, flags, *args)

    def no_lookup_of_path(real: Callable[..., object]) -> Callable[..., object]:
        def lookup(name: object, *args: object, **kwargs: object) -> object:
            if name == path:
                raise AssertionError("a check by path can be raced: the file may be swapped before it is opened")
            return real(name, *args, **kwargs)

        return lookup

    monkeypatch.setattr("pii.keys.os.open", open_once)
    for name in ("stat", "lstat", "access"):
        monkeypatch.setattr(f"pii.keys.os.{name}", no_lookup_of_path(getattr(os, name)))
    monkeypatch.setattr("builtins.open", no_lookup_of_path(open))
    # WHEN it is read THEN it is opened once, checked with fstat and read through that descriptor
    assert Settings.from_env({"MASKING_KEY_FILE": path}).key_source.load() == {1: decode_key(K1)}
    assert opened == [path]


def test_a_key_file_that_is_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            Settings.from_env({"MASKING_KEY_FILE": str(path)})
            outcome.append(None)
        except ConfigError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock the reader before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO as the key file blocked")
    assert isinstance(outcome[0], ConfigError) and "not a regular file" in str(outcome[0])


@needs_root
def test_a_key_file_owned_by_another_user_is_refused_even_at_mode_600(tmp_path: Path) -> None:
    path = key_file(tmp_path, K1)
    os.chown(path, IMAGE_UID + 1, IMAGE_UID + 1)
    with pytest.raises(ConfigError, match=f"owned by uid {IMAGE_UID + 1}.*neither this process's uid"):
        Settings.from_env({"MASKING_KEY_FILE": path})


@needs_root
def test_a_compose_secret_owned_by_the_image_user_at_mode_400_is_read(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Compose (without Swarm) bind-mounts the host file as it is: owner and mode come from the host.
    path = key_file(tmp_path, K1, 0o400)
    os.chown(path, IMAGE_UID, IMAGE_UID)
    monkeypatch.setattr("pii.keys.os.geteuid", lambda: IMAGE_UID)
    assert Settings.from_env({"MASKING_KEY_FILE": path}).key_source.versions == (1,)


@needs_root
@pytest.mark.parametrize("mode", [0o440, 0o640, 0o400])
def test_a_kubernetes_secret_owned_by_root_and_readable_by_the_fs_group_is_read(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: int,
) -> None:
    # GIVEN the layout of a Kubernetes secret volume: symlinks into a timestamped directory, files
    # owned by root; with defaultMode 0400 and an fsGroup the kubelet makes them 0440 root:fsGroup
    data = tmp_path / "..2026_11_26_09_00_00.123"
    data.mkdir()
    (data / "masking_key").write_text(K1)
    os.chmod(data / "masking_key", mode)
    os.chown(data / "masking_key", 0, IMAGE_UID)
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "masking_key").symlink_to("..data/masking_key")
    # WHEN the image's user reads it THEN the file reached through the links is read
    monkeypatch.setattr("pii.keys.os.geteuid", lambda: IMAGE_UID)
    assert Settings.from_env({"MASKING_KEY_FILE": str(tmp_path / "masking_key")}).key_source.versions == (1,)


@needs_root
@pytest.mark.parametrize("mode", [0o460, 0o444, 0o404, 0o450])
def test_a_root_owned_key_file_writable_by_its_group_or_open_to_others_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: int,
) -> None:
    path = key_file(tmp_path, K1, mode)
    monkeypatch.setattr("pii.keys.os.geteuid", lambda: IMAGE_UID)
    with pytest.raises(ConfigError, match=f"owned by root.*chmod 440 {path}"):
        Settings.from_env({"MASKING_KEY_FILE": path})


def test_a_kms_ciphertext_is_only_decoded_at_configuration_and_kms_endpoints_have_their_own_variable() -> None:
    blob = base64.b64encode(b"wrapped" * 20).decode()
    settings = Settings.from_env(
        {
            "MASKING_KEY_KMS_CIPHERTEXT": blob,
            "AWS_ENDPOINT_URL": "http://sqs:4566",
            "AWS_ENDPOINT_URL_KMS": "http://kms:4599",
            "MASKING_KEY_KMS_KEY_ID": "alias/x",
        }
    )
    source = settings.key_source
    assert isinstance(source, KmsWrappedKeys) and source.ciphertexts == {1: b"wrapped" * 20}
    assert (source.endpoint_url, source.key_id, settings.endpoint_url) == (
        "http://kms:4599",
        "alias/x",
        "http://sqs:4566",
    )
    assert KmsSettings.from_env({"AWS_ENDPOINT_URL": "http://e:1"}).endpoint_url == "http://e:1"
    with pytest.raises(ConfigError, match="MASKING_KEY_KMS_CIPHERTEXT is malformed"):
        Settings.from_env({"MASKING_KEY_KMS_CIPHERTEXT": "1:not base64!"})


# -- the keyring --------------------------------------------------------------------------------


def test_new_tokens_use_the_active_version_and_tokens_of_every_held_version_unmask() -> None:
    old = Masker(decode_key(K1)).mask("ip", "10.0.0.1")
    new = KEYRING.mask("ip", "10.0.0.1")
    assert token_version(old) == 1 and token_version(new) == 2
    assert KEYRING.unmask(old) == KEYRING.unmask(new) == "10.0.0.1"


def test_a_token_of_a_retired_version_says_which_version_is_missing() -> None:
    retired = Masker.from_keys({2: decode_key(K2)}, active=2)
    with pytest.raises(UnmaskError, match="key version 1, which this keyring does not hold \\(it holds 2\\)"):
        retired.unmask(Masker(decode_key(K1)).mask("device_id", "593-47-5928"))


def test_rekey_gives_exactly_the_token_the_active_key_makes_so_duplicates_line_up() -> None:
    old = Masker(decode_key(K1)).mask("device_id", "593-47-5928")
    assert KEYRING.rekey(old) == KEYRING.mask("device_id", "593-47-5928") != old
    assert KEYRING.rekey(KEYRING.rekey(old)) == KEYRING.rekey(old)  # a current token is left alone
    body = Masker(decode_key(K1)).mask("rejected_body", '{"ip": "1.2.3.4"')
    assert KEYRING.unmask(KEYRING.rekey(body)) == '{"ip": "1.2.3.4"'


def test_rekey_of_something_that_is_not_a_token_raises_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a masked token"):
        KEYRING.rekey("x")


def test_one_key_under_two_versions_or_an_absent_active_version_is_refused() -> None:
    with pytest.raises(InvalidKey, match="versions 1 and 2 hold the same key"):
        Masker.from_keys({1: decode_key(K1), 2: decode_key(K1)}, active=2)
    with pytest.raises(InvalidKey, match="active key version 3 is not in the keyring"):
        Masker.from_keys({1: decode_key(K1)}, active=3)


def test_the_repr_of_a_keyring_shows_versions_only() -> None:
    assert repr(KEYRING) == "Masker(version=2, versions=[1, 2])"
    assert repr(StaticKeys("MASKING_KEYS", {1: decode_key(K1)})) == "StaticKeys(MASKING_KEYS, versions=[1])"


@given(st.sampled_from(["ip", "device_id", "rejected_body"]), st.text())
def test_any_value_survives_a_rotation(field: str, value: str) -> None:
    old = Masker(decode_key(K1)).mask(field, value)
    assert KEYRING.unmask(KEYRING.rekey(old)) == canonical(field, value)


@given(st.sampled_from(["ip", "device_id", "rejected_body"]), st.text() | st.ip_addresses().map(str))
def test_any_legacy_v1_token_unmasks_and_rekeys_to_the_token_of_today(field: str, value: str) -> None:
    old = legacy_token(decode_key(K1), 1, field, value)
    assert KEYRING.unmask(old) == value  # the legacy plaintext is the text as it came
    assert KEYRING.rekey(old) == KEYRING.mask(field, value)
    assert KEYRING.unmask(KEYRING.rekey(old)) == canonical(field, value)
    same_key = Masker(decode_key(K1))  # the format changes even when the key does not
    assert same_key.rekey(old) == same_key.mask(field, value) != old


# -- the audit entry ----------------------------------------------------------------------------


def test_an_audit_entry_holds_fingerprints_of_the_tokens_and_nothing_else_of_them() -> None:
    token = KEYRING.mask("ip", "10.0.0.1")
    entry = UnmaskAudit.of("alice", "case 7", [token, token])
    assert entry.fingerprints == (token_fingerprint(token),) * 2
    assert re.fullmatch(r"[0-9a-f]{16}", entry.fingerprints[0])
    assert entry.fingerprints[0] == hashlib.sha256(token.encode()).hexdigest()[:16]
    assert token not in repr(entry) and "10.0.0.1" not in repr(entry)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["rekey", "--help"], "--batch-size"),
        (["keygen", "--help"], "--kms-key-id"),
        (["unmask", "--help"], "--requested-by"),
    ],
)
def test_the_key_commands_document_their_options(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and option in capsys.readouterr().out
