"""Shared fixtures: real PostgreSQL, a real SQS emulator over HTTP, and a Docker engine.

Locally a missing service skips the tests that need it; under CI=true it fails them.
TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) and TEST_SQS_ENDPOINT
(default http://localhost:4566) choose the services.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import settings

from helpers import TEST_SQS_ENDPOINT, emulator_client, unavailable

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Hypothesis profiles: "dev" (the default: 100 examples) and "ci" (CI=true: 500 examples). Both are
# random, so each CI run tries new examples; a failure prints its falsifying example and the
# @reproduce_failure decorator that replays it (print_blob), and Hypothesis's own seed line. They set
# the pure properties (parsing, masking); the database-backed hostile-input property sets its own,
# bounded count (tests/integration).
settings.register_profile("dev", max_examples=100, print_blob=True)
settings.register_profile("ci", max_examples=500, deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")


def pytest_configure(config: pytest.Config) -> None:
    """The simulation's fresh seeds start here (tests/unit/test_simulation.py): drawn once per run,
    before xdist starts its workers (they inherit the environment), unless SIM_FRESH_START is set."""
    if not os.environ.get("SIM_FRESH_START"):
        os.environ["SIM_FRESH_START"] = str(random.SystemRandom().randrange(10**6, 10**9))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the simulation's seeds, so that a run's fresh seeds can be tried again."""
    reports = [r for reports in terminalreporter.stats.values() for r in reports if hasattr(r, "nodeid")]
    if any("test_simulation.py" in r.nodeid for r in reports):
        fixed = int(os.environ.get("SIM_SEEDS", "3000"))
        start = int(os.environ["SIM_FRESH_START"])
        terminalreporter.write_line(
            f"simulation: seeds 0..{fixed - 1} and fresh seeds {start}..{start + max(1, fixed // 6) - 1} "
            f"(SIM_FRESH_START={start}); replay one: SIM_SEED=<seed> ./scripts/test.sh tests/unit/test_simulation.py"
        )


@pytest.fixture(scope="session")
def masking_key() -> str:
    from pii.masking import generate_key

    return generate_key()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    import psycopg2

    try:
        psycopg2.connect(TEST_DATABASE_URL, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        unavailable(f"PostgreSQL at {TEST_DATABASE_URL} ({exc})")
    return TEST_DATABASE_URL


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A DSN whose search_path is a fresh schema, dropped after the test."""
    import psycopg2

    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(pg_admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_admin_url else "?"
    yield f"{pg_admin_url}{sep}options={quote(f'-csearch_path={schema}')}"
    with conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


@pytest.fixture(scope="session")
def sqs_client():
    client = emulator_client("sqs", TEST_SQS_ENDPOINT)
    try:
        client.list_queues()
    except Exception as exc:  # noqa: BLE001 - any failure means: no emulator
        unavailable(f"SQS emulator at {TEST_SQS_ENDPOINT} ({type(exc).__name__})")
    return client


@pytest.fixture
def queue_url(sqs_client) -> Iterator[str]:
    """A fresh uuid-named queue, deleted after the test."""
    url = sqs_client.create_queue(QueueName=f"test-{uuid.uuid4().hex}")["QueueUrl"]
    yield url
    sqs_client.delete_queue(QueueUrl=url)


@pytest.fixture
def etl_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, queue_url: str, database_url: str, masking_key: str):
    """The environment main() reads, pointed at this test's queue and schema; no .env in cwd."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("AWS_", "SQS_", "DATABASE_URL", "MASKING_KEY")):
            monkeypatch.delenv(name)
    env = {
        "AWS_ENDPOINT_URL": TEST_SQS_ENDPOINT,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "SQS_QUEUE_URL": queue_url,
        "DATABASE_URL": database_url,
        "MASKING_KEY": masking_key,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def db_env(database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Only DATABASE_URL set (no .env from the checkout, no key): for commands that need no queue."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("MASKING_KEY", "DATABASE_URL")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", database_url)
    return database_url


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The Docker engine's version (DOCKER_HOST, else the default socket); see docker_engine.py."""
    from docker_engine import engine_version

    return engine_version()


@pytest.fixture(scope="session")
def etl_image(docker_engine: str) -> str:
    """Our image, built once per session from the Dockerfile (docker_engine.ETL_IMAGE, kept as the cache)."""
    import time

    from docker_engine import ETL_IMAGE, build_image

    started = time.monotonic()
    build_image(ETL_IMAGE)
    print(f"docker build: {time.monotonic() - started:.1f} s")  # shown with -rA
    return ETL_IMAGE
