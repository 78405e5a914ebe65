"""The whole command line: the options every command takes, the run's, and each subcommand's own."""

from __future__ import annotations

import argparse

from cli import check, keys, maintenance, replay, run, unmask
from cli.arguments import Parser
from cli.exit_codes import exit_code_list


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python main.py [options] [SUBCOMMAND ...]`; `handler` in the result runs the command."""
    parser = Parser(
        prog="main.py",
        description="Consume login events from SQS, mask ip/device_id, store them in PostgreSQL.",
        epilog=exit_code_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="text (default) or json: one object per line"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    run.register_options(parser)
    parser.set_defaults(handler=run.run)  # no subcommand: the run
    subparsers = parser.add_subparsers(dest="command")
    for command in (check, unmask, keys, replay, maintenance):
        command.register(subparsers)
    subparsers.metavar = "{" + ",".join(subparsers.choices) + "}"
    return parser
