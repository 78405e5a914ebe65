"""Tokens are Tink's DeterministicAead output; Tink (PyPI `tink`, a test dependency only) is the oracle.

Tink decrypts our tokens with the keyset we export, and we unmask what Tink encrypts with a keyset
Tink made. Also: the plaintext forms, keysets as a key source, and `keygen --format tink`.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from pathlib import Path

import pytest
import tink
from hypothesis import given, settings
from hypothesis import strategies as st
from tink import daead, secret_key_access

from cli.exit_codes import EXIT_CONFIG, EXIT_OK
from config import ConfigError, Settings
from main import main
from pii import encoding
from pii.masking import KEY_BYTES, Masker, UnmaskError, canonical, decode_key, generate_key
from pii.tink_keyset import AES_SIV_TYPE_URL, KeysetError, keyset_json, parse_keyset
from tests.legacy_tokens import legacy_token
from tests.strategies import accepting_share

daead.register()
K1, K2 = decode_key(generate_key()), decode_key(generate_key())
KEYRING = Masker.from_keys({1: K1, 3_000_000_000: K2}, active=3_000_000_000)
KEYSET = keyset_json({1: K1, 3_000_000_000: K2}, 3_000_000_000)
PLAINTEXT = {"ip": encoding.encode_ip, "device_id": encoding.encode_padded, "rejected_body": encoding.encode_text}
values = st.text() | st.ip_addresses().map(str)


def tink_primitive(keyset: str) -> daead.DeterministicAead:
    handle = tink.json_proto_keyset_format.parse(keyset, secret_key_access.TOKEN)
    return handle.primitive(daead.DeterministicAead)


TINK = tink_primitive(KEYSET)


# -- Tink as the oracle -------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.sampled_from(sorted(PLAINTEXT)), values)
def test_tink_decrypts_our_tokens_with_the_exported_keyset_to_the_documented_plaintext(field: str, value: str) -> None:
    token = KEYRING.mask(field, value)
    plain = TINK.decrypt_deterministically(base64.b64decode(token), field.encode())
    assert plain == PLAINTEXT[field](value)
    assert TINK.encrypt_deterministically(plain, field.encode()) == base64.b64decode(token)  # byte for byte


@settings(max_examples=200)
@given(st.sampled_from(sorted(PLAINTEXT)), values)
def test_we_unmask_what_tink_encrypts_with_a_keyset_tink_made(field: str, value: str) -> None:
    handle = tink.new_keyset_handle(daead.deterministic_aead_key_templates.AES256_SIV)
    exported = tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    keys, primary = parse_keyset(exported, key_bytes=KEY_BYTES)
    ours = Masker.from_keys(keys, active=primary)
    sealed = handle.primitive(daead.DeterministicAead).encrypt_deterministically(
        PLAINTEXT[field](value), field.encode()
    )
    token = base64.b64encode(sealed).decode()
    assert ours.unmask(token) == canonical(field, value)
    assert ours.mask(field, value) == token


def test_the_keyset_keygen_prints_is_one_tink_accepts_and_rotate_makes_a_new_primary(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    # GIVEN a keyset from `keygen --format tink`
    assert main(["keygen", "--format", "tink"]) == EXIT_OK
    first = capsys.readouterr().out
    tink_primitive(first)  # Tink parses it
    # WHEN the ETL is given it, and a rotation adds a key
    for name in [n for n in os.environ if n.startswith("MASKING_KEY")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MASKING_KEYSET", first)
    assert main(["keygen", "--format", "tink", "--rotate"]) == EXIT_OK
    second = capsys.readouterr().out
    monkeypatch.setenv("MASKING_KEYSET", second)
    assert main(["keygen", "--format", "tink", "--export"]) == EXIT_OK
    exported = capsys.readouterr().out
    # THEN the rotated keyset holds the old key and a new primary; Tink opens tokens of either key
    old_keys, old_primary = parse_keyset(first, key_bytes=KEY_BYTES)
    keys, primary = parse_keyset(second, key_bytes=KEY_BYTES)
    assert primary != old_primary and keys[old_primary] == old_keys[old_primary] and len(keys) == 2
    assert json.loads(exported) == json.loads(second)
    old_token = Masker.from_keys(old_keys, active=old_primary).mask("ip", "10.1.2.3")
    settings_now = Settings.from_env({"MASKING_KEYSET": second})
    assert settings_now.key_version == primary
    assert tink_primitive(second).decrypt_deterministically(base64.b64decode(old_token), b"ip") == encoding.encode_ip(
        "10.1.2.3"
    )


def test_export_of_a_base64_keyring_keeps_its_versions_as_key_ids_so_legacy_tokens_still_open(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in [n for n in os.environ if n.startswith("MASKING_KEY")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MASKING_KEY", base64.b64encode(K1).decode())
    assert main(["keygen", "--format", "tink", "--export"]) == EXIT_OK
    keys, primary = parse_keyset(capsys.readouterr().out, key_bytes=KEY_BYTES)
    assert (keys, primary) == ({1: K1}, 1)
    ours = Masker.from_keys(keys, active=primary)
    assert ours.unmask(legacy_token(K1, 1, "device_id", "593-47-5928")) == "593-47-5928"


@pytest.mark.parametrize(
    "argv",
    [
        ["keygen", "--export"],
        ["keygen", "--format", "tink", "--kms-key-id", "k"],
        ["keygen", "--format", "tink", "--export", "--rotate"],
    ],
)
def test_keygen_refuses_options_that_do_not_go_together(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_CONFIG


# -- the plaintext forms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other", "shown"),
    [
        ("1.2.3.4", "::ffff:1.2.3.4", "1.2.3.4"),
        ("2001:DB8::1", "2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("::FFFF:10.0.0.1", "10.0.0.1", "10.0.0.1"),
    ],
)
def test_one_address_written_two_ways_gives_one_token_and_unmasks_to_the_canonical_text(
    one: str, other: str, shown: str
) -> None:
    assert KEYRING.mask("ip", one) == KEYRING.mask("ip", other)
    assert KEYRING.unmask(KEYRING.mask("ip", one)) == shown


@given(st.ip_addresses())
def test_an_ip_is_its_16_byte_form_ipv4_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    mapped = address.packed if address.version == 6 else bytes(10) + b"\xff\xff" + address.packed
    assert encoding.encode_ip(str(address)) == mapped
    assert encoding.encode_ip(address.exploded) == mapped


IP_ALPHABET = "0123456789abcdefABCDEF:.% x"
# Addresses written every way ipaddress accepts (so the accepting side is reached), the same with a
# zone or one character changed (near misses), and text over an IP's alphabet.
ip_texts = (
    st.ip_addresses().map(str)
    | st.ip_addresses(v=6).map(lambda address: address.exploded.upper())
    | st.tuples(st.ip_addresses(v=6).map(str), st.sampled_from(["%eth0", "%1", "%"])).map("".join)
    | st.tuples(st.ip_addresses().map(str), st.integers(0, 40), st.sampled_from(IP_ALPHABET)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
    )
    | st.text(alphabet=IP_ALPHABET, max_size=45)
)


def _an_address_without_zone(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


def test_the_ip_texts_reach_the_accepting_side_a_quarter_of_the_time() -> None:
    assert accepting_share(ip_texts, _an_address_without_zone) >= 0.25


@settings(max_examples=500)
@given(ip_texts)
def test_the_fast_parser_accepts_exactly_what_ipaddress_accepts_without_a_zone(text: str) -> None:
    """inet_pton (libc) is the hot path; `ipaddress` is the definition the docs give."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    plain = encoding.encode_ip(text)
    if address is None or "%" in text:
        assert len(plain) != encoding.IP_BYTES and encoding.decode_ip(plain) == text
    else:
        assert encoding.decode_ip(plain) == str(getattr(address, "ipv4_mapped", None) or address)


@pytest.mark.parametrize("value", ["", "not an ip", "01.2.3.4", " 1.2.3.4", "fe80::1%eth0", "1.2.3.4\x00"])
def test_a_value_that_is_not_an_ip_is_kept_in_the_padded_form(value: str) -> None:
    token = KEYRING.mask("ip", value)
    assert KEYRING.unmask(token) == value
    assert TINK.decrypt_deterministically(base64.b64decode(token), b"ip") == encoding.pad(value.encode())


@given(st.binary(max_size=200))
def test_the_padding_is_unambiguous(data: bytes) -> None:
    padded = encoding.pad(data)
    assert len(padded) % encoding.PAD_BLOCK_BYTES == 0 and len(padded) > len(data)
    assert encoding.unpad(padded) == data


@pytest.mark.parametrize("data", [b"", b"x" * 32, b"x" * 31 + b"\x00", bytes(32), b"x" + b"\x80" + bytes(62)])
def test_a_plaintext_that_is_not_padded_is_refused(data: bytes) -> None:
    with pytest.raises(encoding.EncodingError):
        encoding.unpad(data)


def test_an_authentic_token_of_a_foreign_plaintext_form_is_a_clear_unmask_error() -> None:
    sealed = TINK.encrypt_deterministically(b"raw text, not padded", b"device_id")
    with pytest.raises(UnmaskError, match="decrypts as device_id, but plaintext is not in the padded form"):
        KEYRING.unmask(base64.b64encode(sealed).decode())


# -- keysets as a key source ---------------------------------------------------------------------


def entry(key_id: int, key: bytes, **changes: object) -> dict[str, object]:
    value = base64.b64encode(b"\x12\x40" + key).decode()
    base: dict[str, object] = {
        "keyData": {"typeUrl": AES_SIV_TYPE_URL, "value": value, "keyMaterialType": "SYMMETRIC"},
        "status": "ENABLED",
        "keyId": key_id,
        "outputPrefixType": "TINK",
    }
    return {**base, **changes}


def test_a_keyset_loads_its_enabled_keys_and_its_primary() -> None:
    text = json.dumps({"primaryKeyId": 7, "key": [entry(7, K1), entry(8, K2, status="DISABLED")]})
    assert parse_keyset(text, key_bytes=KEY_BYTES) == ({7: K1}, 7)


@pytest.mark.parametrize(
    ("keyset", "error"),
    [
        ("not json", "not valid JSON"),
        ({"primaryKeyId": 1}, "not a Tink keyset"),
        ({"encryptedKeyset": "x", "key": []}, "an encrypted keyset"),
        ({"primaryKeyId": 9, "key": [entry(1, K1)]}, "primary key id 9 is not an enabled key"),
        ({"primaryKeyId": 1, "key": [entry(1, K1, status="DISABLED")]}, "primary key id 1 is not an enabled key"),
        ({"primaryKeyId": 1, "key": [entry(1, K1, outputPrefixType="RAW")]}, "only TINK"),
        ({"primaryKeyId": 1, "key": [entry(1, K1), entry(1, K2)]}, "key id 1 appears twice"),
        ({"primaryKeyId": 1, "key": [entry(1, K1[:32])]}, "not an AesSivKey of 64 bytes"),
        (
            {"primaryKeyId": 1, "key": [entry(1, K1, keyData={"typeUrl": "x.AesGcmKey", "value": ""})]},
            "not an AES-SIV key",
        ),
    ],
)
def test_a_keyset_we_cannot_use_is_refused_saying_why_and_never_showing_a_key(keyset: object, error: str) -> None:
    text = keyset if isinstance(keyset, str) else json.dumps(keyset)
    with pytest.raises(KeysetError, match=error) as info:
        parse_keyset(text, key_bytes=KEY_BYTES)
    assert base64.b64encode(b"\x12\x40" + K1).decode() not in str(info.value)


def test_masking_keyset_and_a_key_file_holding_a_keyset_are_key_sources_whose_primary_decides(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    path.write_text(KEYSET)
    path.chmod(0o600)
    for env in ({"MASKING_KEYSET": KEYSET}, {"MASKING_KEY_FILE": str(path)}):
        settings_now = Settings.from_env(env)
        assert settings_now.key_version == 3_000_000_000
        assert settings_now.key_source.load() == {1: K1, 3_000_000_000: K2}
        assert "3000000000" in repr(settings_now) and base64.b64encode(K1).decode() not in repr(settings_now)
        with pytest.raises(ConfigError, match="the keyset's primary key id is 3000000000"):
            Settings.from_env({**env, "MASKING_KEY_VERSION": "1"})
    with pytest.raises(ConfigError, match="MASKING_KEYSET is malformed .*not a Tink JSON keyset"):
        Settings.from_env({"MASKING_KEYSET": base64.b64encode(K1).decode()})
    with pytest.raises(ConfigError, match="several key sources"):
        Settings.from_env({"MASKING_KEYSET": KEYSET, "MASKING_KEY": base64.b64encode(K1).decode()})
