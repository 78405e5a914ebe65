"""The command line's shape: the run is the command without a subcommand and owns its options; every
help lists its exit codes from the one table; each error maps to one code."""

from __future__ import annotations

import argparse
import re

import pytest

from aws.queue_attributes import max_message_bytes, max_receives, visibility_timeout_seconds
from cli import run
from cli.exit_codes import (
    ERRORS,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_UNREACHABLE,
    HANDLED,
    ErrorContext,
    exit_for,
)
from cli.parser import build_parser
from cli.startup import set_up_schema
from config import Settings
from database.errors import SchemaBusy
from main import main
from models import Backoff


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def run_flags() -> list[str]:
    parser = build_parser()
    return sorted(
        option for action in parser._actions if isinstance(action, run.RunOption) for option in action.option_strings
    )


# One valid invocation of each subcommand, without any run option.
MINIMAL = {
    "check": ["check"],
    "unmask": ["unmask", "--reason", "r", "v1.x"],
    "keygen": ["keygen"],
    "rekey": ["rekey"],
    "backfill-networks": ["backfill-networks"],
    "replay": ["replay", "--reason", "r"],
    "retention": ["retention", "--keep-days", "30"],
    "snapshot": ["snapshot"],
}


def test_every_subcommand_has_a_minimal_invocation_here() -> None:
    assert set(MINIMAL) == set(subparsers(build_parser()))


def test_no_argument_and_follow_alone_parse_to_the_run_with_its_defaults() -> None:
    # GIVEN `python main.py` and `python main.py --follow`
    drain, follow = build_parser().parse_args([]), build_parser().parse_args(["--follow", "--receivers", "2"])
    # THEN both are the run, with the run's options and no trace of how they were given
    assert (drain.command, drain.handler, drain.follow) == (None, run.run, False)
    assert (follow.command, follow.handler, follow.follow, follow.receivers) == (None, run.run, True, 2)
    assert drain.batch_size == follow.batch_size > 0 and not hasattr(follow, "run_options_given")


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_a_subcommand_given_a_run_option_before_it_is_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN `python main.py --follow replay ...`: --follow used to be accepted, and replay read it
    valid = {"--max-body-bytes": "64KiB", "--max-bytes-in-hand": "48MiB", "--metrics-port": "9108"}
    for flag in run_flags():
        value = [] if flag == "--follow" else [valid.get(flag, "1")]
        with pytest.raises(SystemExit) as info:
            main([flag, *value, *MINIMAL[command]])
        # THEN argparse refuses it: exit 2, one line naming the option and the subcommand
        assert info.value.code == EXIT_CONFIG, flag
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and command in err[0], err


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_a_subcommand_given_a_run_option_after_it_is_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*MINIMAL[command], "--follow"])
    assert info.value.code == EXIT_CONFIG
    assert "--follow" in capsys.readouterr().err


def test_no_subcommand_reads_a_run_option() -> None:
    parser = build_parser()
    run_dests = {action.dest for action in parser._actions if isinstance(action, run.RunOption)}
    for name, sub in subparsers(parser).items():
        # rekey's and backfill-networks' own --batch-size keep a dest of their own
        assert run_dests.isdisjoint(action.dest for action in sub._actions), name


def exit_code_section(help_text: str) -> tuple[str, dict[str, str]]:
    """(the help before its exit-code list, {code: meaning} of the list)."""
    before, listed = help_text.split("exit codes (docs/operations.md):", 1)
    rows = dict(re.findall(r"^  (\d+|128\+N) +(.*?)(?=^  \S|\Z)", listed, re.M | re.S))
    return before, {code: " ".join(text.split()) for code, text in rows.items()}


@pytest.mark.parametrize("command", ["", *sorted(MINIMAL)])
def test_every_help_lists_its_exit_codes_from_the_one_table_and_names_no_code_elsewhere(command: str) -> None:
    parser = build_parser()
    help_text = (subparsers(parser)[command] if command else parser).format_help()
    before, listed = exit_code_section(help_text)
    assert listed and EXIT_CODES[0] == listed["0"]
    for code, meaning in listed.items():
        if code != "128+N":
            assert meaning == EXIT_CODES[int(code)], (command, code)
    # no code written by hand in the prose or the options' help
    assert not re.search(r"\bexit(?:s| code(?: is)?)? \d", before, re.I), before


def test_each_error_class_is_mapped_once_and_the_retry_budget_is_not_among_them() -> None:
    assert len(HANDLED) == len(set(HANDLED))
    assert "BudgetExhausted" not in {kind.__name__ for kind in HANDLED}
    for kinds, code, _ in ERRORS:
        assert code in EXIT_CODES, kinds


def test_a_schema_lock_held_past_the_budget_at_start_exits_3_naming_the_database() -> None:
    class LockedSchema:
        def connect(self) -> None:
            raise SchemaBusy("the schema set-up waited 5000 ms for a lock")

    # GIVEN a schema lock another session holds for longer than the budget
    with pytest.raises(SchemaBusy) as info:
        set_up_schema(
            LockedSchema(),  # type: ignore[arg-type]
            backoff=Backoff(0.001, 0.001),
            budget_seconds=0,
            dsn="postgresql://etl:secret@db/etl",
        )
    code, line = exit_for(info.value, ErrorContext())
    # THEN exit 3, with the database (its password hidden) and what waited
    assert code == EXIT_UNREACHABLE
    assert "db" in line and "waited 5000 ms" in line and "secret" not in line


@pytest.mark.parametrize(
    ("attributes", "wanted", "expected"),
    [
        ({}, 5, 5),  # no dead-letter queue
        ({"RedrivePolicy": '{"maxReceiveCount": "3"}'}, 5, 2),  # one receive before SQS dead-letters it
        ({"RedrivePolicy": '{"maxReceiveCount": 10}'}, 5, 5),
        ({"RedrivePolicy": '{"maxReceiveCount": 1}'}, 5, 1),  # never below one
        ({"RedrivePolicy": "not json"}, 5, 5),
    ],
)
def test_max_receives_stays_below_the_redrive_policy(attributes: dict[str, str], wanted: int, expected: int) -> None:
    assert max_receives(wanted, attributes) == expected


def test_the_queue_size_limits_come_from_its_attributes_within_the_quota() -> None:
    assert max_message_bytes({"MaximumMessageSize": "262144"}, quota=1_048_576) == 262_144
    assert max_message_bytes({"MaximumMessageSize": "9999999"}, quota=1_048_576) == 1_048_576
    assert max_message_bytes({}, quota=1_048_576) == 1_048_576
    assert visibility_timeout_seconds({"VisibilityTimeout": "45"}) == 45 and visibility_timeout_seconds({}) == 30


def test_the_loop_knows_a_fifo_queue_by_its_attribute() -> None:
    """A FIFO queue's drain must not end while its own messages hold their groups back (etl/pipeline.py,
    `_held_back`): the run tells the loop from the queue's FifoQueue attribute."""
    args = build_parser().parse_args([])
    settings = Settings.from_env({"MASKING_KEY": "A" * 86 + "=="})
    assert run._options(args, settings, {"FifoQueue": "true", "VisibilityTimeout": "30"}).fifo is True
    assert run._options(args, settings, {"VisibilityTimeout": "30"}).fifo is False
