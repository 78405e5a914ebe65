"""One spelling per token: pii.encoding.canonical_spelling and `unmask`'s refusal of any other."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.exit_codes import EXIT_CONFIG
from main import main
from pii.encoding import canonical_spelling
from pii.masking import Masker, decode_key, generate_key

KEY = generate_key()
MASKER = Masker(decode_key(KEY))
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def spellings(token: str) -> set[str]:
    """Every base64 spelling of `token`: its last character before the padding, with any unused low bits."""
    body = token.rstrip("=")
    unused = {2: 4, 1: 2}.get(len(token) - len(body), 0)
    last = ALPHABET.index(body[-1])
    return {
        body[:-1] + ALPHABET[(last & ~((1 << unused) - 1)) | low] + token[len(body) :] for low in range(1 << unused)
    }


@pytest.mark.parametrize(("field", "value", "count"), [("ip", "10.0.0.1", 16), ("device_id", "d-1", 4)])
def test_a_token_has_other_spellings_that_decrypt_alike_and_only_its_own_is_canonical(field, value, count) -> None:
    token = MASKER.mask(field, value)
    others = spellings(token) - {token}
    assert len(others) == count - 1
    for other in others:
        assert MASKER.unmask(other) == value  # base64 ignores those bits: the attack of issue 26
        assert canonical_spelling(other) == token
    assert canonical_spelling(token) == token
    assert canonical_spelling(f" {token}\n") == token


@given(st.binary(min_size=1, max_size=80))
def test_what_the_masker_writes_is_canonical(data: bytes) -> None:
    token = base64.b64encode(data).decode()
    assert canonical_spelling(token) == token
    legacy = "v7." + base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    assert canonical_spelling(legacy) == legacy


def test_a_legacy_token_with_unused_bits_set_is_not_canonical() -> None:
    legacy = "v7." + base64.urlsafe_b64encode(b"\x01\x02").rstrip(b"=").decode()  # 3 chars: 2 unused bits
    other = (
        legacy[:-1]
        + "BCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(legacy[-1])
        ]
    )
    assert canonical_spelling(other) == legacy != other


def test_what_is_not_base64_has_no_canonical_spelling() -> None:
    assert canonical_spelling("not a token!") is None


def test_unmask_refuses_another_spelling_with_one_line_and_prints_nothing(monkeypatch, tmp_path, capsys) -> None:
    # GIVEN the key, and a database the refusal must never reach (none listens there)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKING_KEY", KEY)
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    token = MASKER.mask("ip", "10.0.0.1")
    other = sorted(spellings(token) - {token})[0]
    # WHEN unmask is given that other spelling
    code = main(["unmask", "--reason", "r", "--requested-by", "mallory", token, other])
    # THEN exit 2, one line naming the token's position, no value
    captured = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "token 2 is not in its canonical spelling" in captured.err
    assert "10.0.0.1" not in captured.err
