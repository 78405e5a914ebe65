"""`keygen --output FILE`: a key file is written whole or not at all, and an existing one is never lost."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cli.exit_codes import EXIT_CONFIG, EXIT_OK
from main import main
from pii.keys import read_key_file
from pii.masking import decode_key


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("MASKING_KEY")]:
        monkeypatch.delenv(name)
    return tmp_path


def test_keygen_output_writes_a_private_file_and_prints_no_key(
    no_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN keygen writes to a file
    assert main(["keygen", "--output", "masking_key"]) == EXIT_OK
    # THEN the file holds one valid key, mode 0600, and nothing of it went to stdout
    path = no_key / "masking_key"
    assert len(decode_key(path.read_text())) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out, err = capsys.readouterr()
    assert out == "" and "masking_key" in err and path.read_text().strip() not in err
    assert [p.name for p in no_key.iterdir()] == ["masking_key"]  # no temporary file left


def test_keygen_output_refuses_to_replace_an_existing_file(no_key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = no_key / "keyset.json"
    assert main(["keygen", "--format", "tink", "--output", str(path)]) == EXIT_OK
    before = path.read_bytes()
    capsys.readouterr()
    # WHEN a second keygen is pointed at it without --replace
    assert main(["keygen", "--format", "tink", "--output", str(path)]) == EXIT_CONFIG
    # THEN the file is untouched, one line says why, and nothing else was created
    assert path.read_bytes() == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--replace" in err[0]
    assert [p.name for p in no_key.iterdir()] == ["keyset.json"]


def test_rotate_with_replace_keeps_the_previous_keyset_and_adds_a_primary(
    no_key: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a keyset file used as the key source
    assert main(["keygen", "--format", "tink", "--output", "keyset.json"]) == EXIT_OK
    first = (no_key / "keyset.json").read_text()
    monkeypatch.setenv("MASKING_KEY_FILE", "keyset.json")
    # WHEN it is rotated in place
    assert main(["keygen", "--format", "tink", "--rotate", "--output", "keyset.json", "--replace"]) == EXIT_OK
    # THEN the new keyset holds the old key plus a new primary, and the old file is kept beside it
    keys, primary = read_key_file("keyset.json")
    old_keys, old_primary = read_key_file(str(no_key / "keyset.json.previous"))
    assert (no_key / "keyset.json.previous").read_text() == first
    assert set(keys) == set(old_keys) | {primary} and primary != old_primary
    assert old_primary is not None and keys[old_primary] == old_keys[old_primary]
    assert "keyset.json.previous" in capsys.readouterr().err
    # AND a second rotation keeps the first previous one too (never overwritten)
    assert main(["keygen", "--format", "tink", "--rotate", "--output", "keyset.json", "--replace"]) == EXIT_OK
    kept = sorted(p.name for p in no_key.iterdir())
    assert len(kept) == 3 and kept[0] == "keyset.json"
    assert all(name.startswith("keyset.json.previous") for name in kept[1:])
    assert any(json.loads((no_key / name).read_text())["primaryKeyId"] == primary for name in kept[1:])


def test_a_failed_keygen_writes_no_file(no_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN no key source at all: --rotate has nothing to rotate
    # WHEN it is asked to write a file
    assert main(["keygen", "--format", "tink", "--rotate", "--output", "keyset.next.json"]) == EXIT_CONFIG
    # THEN no file, empty or not, was made
    assert list(no_key.iterdir()) == []


def test_a_write_that_fails_midway_leaves_the_existing_file_and_no_temporary(
    no_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = no_key / "masking_key"
    path.write_text("old\n")
    path.chmod(0o600)

    def broken_fsync(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pii.key_files.os.fsync", broken_fsync)
    assert main(["keygen", "--output", str(path), "--replace"]) == EXIT_CONFIG
    assert path.read_text() == "old\n"
    assert [p.name for p in no_key.iterdir()] == ["masking_key"]


def test_output_into_a_missing_directory_is_one_line_exit_2(no_key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--output", "nowhere/masking_key"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


@pytest.mark.usefixtures("env_file_in_cwd")
def test_a_key_source_in_the_environment_wins_over_the_env_file_and_says_so_once(
    no_key: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a .env that holds a keyring (as run.sh's set-up and the MASKING_KEYS rotation leave it)
    from pii.masking import generate_key

    assert main(["keygen", "--format", "tink", "--output", "keyset.json"]) == EXIT_OK
    (no_key / ".env").write_text(f"MASKING_KEYS=1:{generate_key()},2:{generate_key()}\nMASKING_KEY_VERSION=2\n")
    before, _primary = read_key_file("keyset.json")
    capsys.readouterr()
    # WHEN the documented rotation names another source on the command line
    monkeypatch.setenv("MASKING_KEY_FILE", "keyset.json")
    code = main(["keygen", "--format", "tink", "--rotate", "--output", "keyset.json", "--replace"])
    # THEN the command line's source is used, one line on stderr says .env's was ignored
    assert code == EXIT_OK
    keys, _ = read_key_file("keyset.json")
    assert set(before) < set(keys) and len(keys) == 2
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "ignored" in line]
    assert len(notes) == 1 and "MASKING_KEY_FILE" in notes[0] and "MASKING_KEYS" in notes[0]
    assert "MASKING_KEY_VERSION" in notes[0]
    assert "MASKING_KEYS" not in os.environ and "MASKING_KEY_VERSION" not in os.environ
