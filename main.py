"""login-etl: SQS login events -> reversible PII masking -> PostgreSQL `user_logins`.

    python main.py                 drain the queue, then exit with a summary
    python main.py --follow        keep consuming until SIGINT/SIGTERM
    python main.py unmask --reason TEXT TOKEN...  print the original values (needs the key; audited)
    python main.py keygen [--kms-key-id ID]       print a new MASKING_KEY (or a KMS-wrapped one)
    python main.py keygen --format tink [--export | --rotate]  a Tink JSON keyset (new, or of the keyring)
    python main.py rekey           rewrite stored tokens of older key versions under the active one
    python main.py backfill-networks  give rows stored before schema 7 their network token (needs the key)
    python main.py replay --reason TEXT [--dry-run]  load quarantined messages that now pass (audited)
    python main.py check           check configuration and services, as a checklist
    python main.py retention --keep-days N [--dry-run]   drop daily partitions older than N days (audited)
    python main.py snapshot        nightly: the closed days' token indexes, then refresh the analysts'
                                   all-time snapshot user_login_duplicates_snapshot

This module is the entry point only: it parses (cli.parser), runs the command's handler, and maps
an error to the one table of exit codes (cli/exit_codes.py: printed by --help; the table in
docs/operations.md says the same, checked by tests/unit/test_docs.py). Each command, its arguments
and its handler are in cli/.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # An orchestrator may stop a replica while it is still starting (importing boto3 takes half a
    # second): until the pipeline's own handlers are in place nothing has been received, so a
    # SIGTERM ends the start cleanly, exit 0, instead of killing the process by the signal.
    def _stopped_while_starting(signum: int, frame: object) -> None:
        sys.stderr.write(f"{signal.Signals(signum).name} received while starting: nothing received yet, exiting\n")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stopped_while_starting)

import logging
import os
import resource
from collections.abc import Sequence
from pathlib import Path

from dotenv import dotenv_values

from cli.arguments import UsageError
from cli.exit_codes import EXIT_INTERRUPTED, EXIT_PIPE_CLOSED, HANDLED, ErrorContext, exit_for, fail
from cli.parser import build_parser
from config import KEY_SOURCES
from etl.observability import configure_logging

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code. Expected errors end as one line and a code (cli.exit_codes)."""
    context = ErrorContext()
    _no_core_dumps()
    try:
        return _main(argv, context)
    except KeyboardInterrupt:
        # Ctrl-C before the pipeline's own handlers are in place (loading keys, connecting):
        # nothing has been received yet, so there is nothing to finish.
        return fail("interrupted", EXIT_INTERRUPTED)
    except HANDLED as exc:
        code, message = exit_for(exc, context)
        return fail(message, code)


def _no_core_dumps() -> None:
    """RLIMIT_CORE 0, soft and hard: a core file would hold the masking key, the database password
    and the masker's cache of recent raw values. Nothing here can raise it again."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # pragma: no cover - a platform without the limit
        logger.debug("could not turn core dumps off")


def _main(argv: Sequence[str] | None, context: ErrorContext) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet, args.log_format)
    load_env_file(env_file())
    try:
        code: int = args.handler(args, context)
    except UsageError as exc:
        parser.error(str(exc))
    return code


def env_file() -> Path:
    """The .env file main() reads: the one in the working directory (tests point it elsewhere)."""
    return Path.cwd() / ".env"


def load_env_file(path: Path) -> None:
    """Load `path` into os.environ; the real environment wins, variable by variable.

    A key source set in the environment (or on the command line: `MASKING_KEY_FILE=k.json python
    main.py ...`) wins as a whole: the .env's key sources and its MASKING_KEY_VERSION, which belong
    to the .env's keyring, are then ignored, and one line on stderr says so.
    """
    if not path.is_file():
        return
    chosen = [name for name in KEY_SOURCES if os.environ.get(name, "").strip()]
    ignored = []
    for name, value in dotenv_values(path).items():
        if value is None or name in os.environ:
            continue
        if chosen and (name in KEY_SOURCES or name == "MASKING_KEY_VERSION"):
            if value.strip():
                ignored.append(name)
            continue
        os.environ[name] = value
    if ignored:
        print(
            f"note: the key source in the environment ({', '.join(chosen)}) wins: {path.name}'s "
            f"{', '.join(ignored)} ignored",
            file=sys.stderr,
        )


def _run_main() -> int:
    """main(), but a reader that closed our stdout early (`| head`) ends it quietly: no traceback."""
    try:
        code = main()
        sys.stdout.flush()  # what is still buffered fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that this fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(_run_main())
