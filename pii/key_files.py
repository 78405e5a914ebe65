"""Writing a key or keyset to a file so that no failure can lose one (`keygen --output`).

A key lost is every token made with it unrecoverable, so the write is all or nothing: the text is
made first, then written to a temporary file in the same directory (mode 0600), fsynced, and only
then linked or renamed to its name, and the directory fsynced. An existing file is never replaced
unless asked; then it is first kept as ``FILE.previous`` (or ``FILE.previous.<UTC time>`` when that
is taken), so a rotation that turns out wrong can be undone. Errors name the path, never a key.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

from pii.keys import KeySourceError


class KeyFileError(KeySourceError):
    """Raised when a key file cannot be written, or would replace one not meant to be replaced."""


def write_key_file(path: str | os.PathLike[str], text: str, *, replace: bool = False) -> Path | None:
    """Write `text` to `path` atomically (mode 0600); return where the replaced file was kept, if any.

    Without `replace`, an existing `path` is refused (KeyFileError) and nothing is written.
    """
    target = Path(path)
    if not text.strip():
        raise KeyFileError(f"refusing to write an empty key file {target}")
    directory = target.parent
    if target.is_dir():
        raise KeyFileError(f"{target} is a directory: give a file name")
    if not directory.is_dir():
        raise KeyFileError(f"cannot write {target}: directory {directory} does not exist")
    if target.exists() and not replace:
        raise KeyFileError(
            f"{target} exists: refusing to replace a key file (add --replace: the old one is kept as {target}.previous)"
        )
    temporary = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        _write_synced(temporary, text if text.endswith("\n") else text + "\n")
        kept = _keep_previous(target) if replace and target.exists() else None
        if replace:
            os.replace(temporary, target)
        else:
            os.link(temporary, target)  # fails if `target` appeared meanwhile: never clobbers
            os.unlink(temporary)
        _sync_directory(directory)
    except FileExistsError:
        raise KeyFileError(f"{target} appeared while writing: nothing replaced, run again") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {target}: {exc.strerror or exc}; the existing files are unchanged") from None
    finally:
        temporary.unlink(missing_ok=True)
    return kept


def _write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        data = text.encode("ascii")
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_previous(target: Path) -> Path:
    """A second name for the file about to be replaced (a hard link, else a synced copy)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidates = [target.with_name(f"{target.name}.previous"), target.with_name(f"{target.name}.previous.{stamp}")]
    candidates += [target.with_name(f"{target.name}.previous.{stamp}-{n}") for n in range(2, 100)]
    for candidate in candidates:
        try:
            os.link(target, candidate)
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some mounted file systems): copy instead
            try:
                _write_synced(candidate, target.read_text(encoding="ascii"))
            except FileExistsError:
                continue
        return candidate
    raise KeyFileError(f"too many {target.name}.previous files in {target.parent}: move some away first")


def _sync_directory(directory: Path) -> None:
    """Make the rename durable: fsync the directory that holds the new name (where the OS allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
