"""The parser class and the argument types the commands share."""

from __future__ import annotations

import argparse
import getpass
import math
import os
import re
import textwrap
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

from cli.exit_codes import EXIT_CONFIG, exit_code_list
from config import parse_bytes
from etl.observability import escape_controls

# The namespace attribute where RunOption notes the run options given (removed after parsing).
_RUN_OPTIONS_GIVEN = "run_options_given"


class UsageError(Exception):
    """Raised by a command for arguments that parse but do not go together; main() ends it as argparse does."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the whole usage text; and a
    run option (RunOption) given before a subcommand is a usage error: it belongs to the run alone."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {escape_controls(message)} (see --help)\n")

    def parse_known_args(  # type: ignore[override]  # one signature for typeshed's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        given: list[str] = getattr(parsed, _RUN_OPTIONS_GIVEN, [])
        if given:
            delattr(parsed, _RUN_OPTIONS_GIVEN)
            command = getattr(parsed, "command", None)
            if command is not None:
                self.error(f"{given[0]} is an option of the run (`python main.py {given[0]} ...`), not of {command}")
        return parsed, extras


class RunOption(argparse.Action):
    """Stores the value (or `const`, for nargs=0: a switch) and notes the option as given, so that
    Parser refuses it with a subcommand."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, _RUN_OPTIONS_GIVEN, [*getattr(namespace, _RUN_OPTIONS_GIVEN, []), option_string])


def add_command(
    subparsers: Any, name: str, *, help: str, description: str, exit_codes: Sequence[int]
) -> argparse.ArgumentParser:
    """A subcommand's parser: its description wrapped, and its exit codes listed from the one table."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, width=100),
        epilog=exit_code_list(*exit_codes),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def os_user() -> str:
    """The OS user, for an audit row's requested_by when --requested-by is not given."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}"


def audit_text(limit: int) -> Callable[[str], str]:
    """A non-blank text of at most `limit` characters, stripped."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be blank")
        if len(text) > limit:
            raise argparse.ArgumentTypeError(f"at most {limit} characters")
        return text.strip()

    return parse


def add_audit_arguments(parser: argparse.ArgumentParser, why: str) -> None:
    """--reason (required) and --requested-by: who and why, for an audited command."""
    parser.add_argument(
        "--reason", required=True, type=audit_text(1000), help=f"{why} (required; recorded in the audit)"
    )
    parser.add_argument(
        "--requested-by", type=audit_text(128), default=None, metavar="NAME", help="who asks (default: the OS user)"
    )


def since(text: str) -> datetime:
    """A point in time: an ISO 8601 date or date-time (UTC unless it says), or an age: 90m, 12h, 7d."""
    age = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[age.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(age.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected an ISO date or date-time (2026-11-26, 2026-11-26T09:00:00Z) or an age (90m, 12h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def byte_count(minimum: int) -> Callable[[str], int]:
    """A byte count (`65536`, `64KiB`, `48MiB`) of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = parse_bytes(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} bytes")
        return value

    return parse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    """A finite number of seconds, > 0 (or >= 0 where zero means "at once")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError("must be >= 0" if allow_zero else "must be > 0")
        return value

    return parse


def port(text: str) -> int:
    """A TCP port number, 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 1..65535")
    return int(text)
