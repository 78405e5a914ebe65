"""The services a benchmark runs against (the SQS emulator, PostgreSQL, the masking key), their options,
and what one timed run measured."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from pii.masking import generate_key


def add_service_arguments(parser: argparse.ArgumentParser, *, database: bool = True) -> None:
    """The options of every benchmark: the SQS emulator and (with `database`) the PostgreSQL server."""
    parser.add_argument("--endpoint-url", default="http://localhost:4566", help="the SQS emulator")
    if database:
        parser.add_argument(
            "--database-url",
            default="postgresql://postgres@127.0.0.1:5432/postgres",
            help="server to create the bench_<uuid> databases on (its own data is not touched)",
        )


@dataclass(frozen=True)
class Services:
    """Where the emulator and PostgreSQL are, and the key the ETL masks with."""

    endpoint_url: str  # the emulator, direct (used for filling and for the no-latency drains)
    region: str
    admin_dsn: str  # a database to run CREATE/DROP DATABASE from; its data is never touched
    masking_key: str

    @classmethod
    def for_emulator(cls, endpoint_url: str, admin_dsn: str) -> Services:
        """The emulator's dummy credentials and region (set in the environment, for the ETL processes
        too, unless already set), and a new masking key."""
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            os.environ.setdefault(name, value)
        return cls(endpoint_url, os.environ["AWS_DEFAULT_REGION"], admin_dsn, generate_key())

    def client(self, endpoint_url: str | None = None) -> Any:
        """A fresh SQS client; `endpoint_url` defaults to the emulator itself."""
        config = Config(retries={"mode": "standard", "max_attempts": 3}, max_pool_connections=16)
        session = boto3.session.Session(region_name=self.region)
        return session.client("sqs", endpoint_url=endpoint_url or self.endpoint_url, config=config)


@dataclass(frozen=True)
class Measurement:
    """One timed run: how many items in how long, and what else was observed."""

    items: int
    seconds: float
    rss_kb: int | None = None
    inner_seconds: float | None = None  # the ETL's own timer (from its summary line)
    tail_seconds: float = 0.0  # the final empty long poll that ends a drain
    check: str | None = None  # "OK ..." or "MISMATCH ..." for runs whose result is verified

    @property
    def rate(self) -> float:
        """Items per second."""
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def extrapolated(self, items: int) -> Measurement:
        """The time `items` would take at this run's pace (the final empty poll counted once)."""
        busy = self.seconds - self.tail_seconds
        return Measurement(
            items=items, seconds=busy * items / self.items + self.tail_seconds, tail_seconds=self.tail_seconds
        )

    @property
    def inner_rate(self) -> float | None:
        """Items per second by the ETL's own timer, if it printed one."""
        return self.items / self.inner_seconds if self.inner_seconds else None
