"""`check`: the configuration and the services, as a checklist (the checks are etl/check.py's)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from cli.arguments import add_command
from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE, ErrorContext
from etl.check import Failure, checklist_from_env


def register(subparsers: Any) -> None:
    """Add `check` to the subcommands."""
    parser = add_command(
        subparsers,
        "check",
        help="check configuration, SQS, the DLQ and PostgreSQL; print a checklist",
        description="Verify the configuration and key, that the queue (and its dead-letter queue) exists, "
        "and that PostgreSQL answers with a current schema (or none yet: the ETL creates it at its first "
        "run). Changes nothing. A configuration or key failure decides the exit code before a service's.",
        exit_codes=(EXIT_OK, EXIT_CONFIG, EXIT_UNREACHABLE),
    )
    parser.set_defaults(handler=check)


def check(args: argparse.Namespace, context: ErrorContext) -> int:
    """Print the checklist; exit EXIT_CONFIG if the configuration failed, else EXIT_UNREACHABLE if a service did."""
    failures = set()
    for item in checklist_from_env(os.environ):
        print(item)
        if not item.passed:
            failures.add(item.failure)
    return EXIT_CONFIG if Failure.CONFIGURATION in failures else EXIT_UNREACHABLE if failures else EXIT_OK
