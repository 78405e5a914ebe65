"""What the commands that hold the key do first: settings and keys, then the schema set-up."""

from __future__ import annotations

import logging
import os

from cli.exit_codes import ErrorContext
from config import Settings, redact_dsn
from database.errors import SchemaBusy
from database.sqs_postgres import PostgresWriter
from etl.retry import BudgetExhausted, Retrier, StopState
from models import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS, Backoff
from pii.masking import Masker

logger = logging.getLogger(__name__)

# A drain gives up on a lost service after this long (the run's --retry-budget-seconds); the one-shot
# commands wait this long for the schema lock at start.
DEFAULT_RETRY_BUDGET_SECONDS = 60.0
DEFAULT_BACKOFF = Backoff(DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS)


def load_keys(context: ErrorContext) -> tuple[Settings, Masker]:
    """Settings from the environment and the keyring they name; the error lines then name the database."""
    settings = Settings.from_env(os.environ)
    context.dsn, context.queue = redact_dsn(settings.database_url), settings.queue_url
    masker = settings.load_masker()
    logger.debug("masking keys loaded: %r", masker)
    return settings, masker


def set_up_schema(
    writer: PostgresWriter, *, backoff: Backoff = DEFAULT_BACKOFF, budget_seconds: float | None, dsn: str
) -> None:
    """Connect and migrate the schema; a schema lock held by someone else is waited out with backoff
    for `budget_seconds` (None: for ever), then SchemaBusy; PostgreSQL unreachable is not retried."""
    retrier = Retrier(backoff, StopState(), budget_seconds=budget_seconds)
    try:
        retrier.call("PostgreSQL", "schema set-up", writer.connect, SchemaBusy)
    except BudgetExhausted as exc:
        raise SchemaBusy(f"PostgreSQL at {redact_dsn(dsn)}: {exc}") from None
