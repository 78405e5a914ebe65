"""Settings: every knob the ETL reads from its environment, validated once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pii.masking import InvalidKey, decode_key

DEFAULT_QUEUE_URL = "http://localhost:4566/000000000000/login-queue"
DEFAULT_DATABASE_URL = "postgresql://postgres:postgres@localhost:5432/postgres"
DEFAULT_REGION = "us-east-1"
KEY_HELP = "create one with `python main.py keygen` and put it in .env as MASKING_KEY=<key>"


class ConfigError(Exception):
    """Raised when the environment is incomplete or malformed; the text says how to fix it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration. Secrets are excluded from the repr."""

    queue_url: str
    database_url: str = field(repr=False)  # may carry a password
    masking_key: bytes = field(repr=False)
    endpoint_url: str | None
    region: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build Settings from a mapping such as os.environ; raise ConfigError."""
        queue_url = env.get("SQS_QUEUE_URL") or DEFAULT_QUEUE_URL
        endpoint_url = env.get("AWS_ENDPOINT_URL_SQS") or env.get("AWS_ENDPOINT_URL") or _endpoint_of(queue_url)
        raw_key = env.get("MASKING_KEY", "")
        if not raw_key.strip():
            raise ConfigError(f"MASKING_KEY is not set: {KEY_HELP}")
        try:
            key = decode_key(raw_key)
        except InvalidKey as exc:
            raise ConfigError(f"MASKING_KEY is malformed ({exc}): {KEY_HELP}") from None
        return cls(
            queue_url=queue_url,
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            masking_key=key,
            endpoint_url=endpoint_url,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        )


def _endpoint_of(queue_url: str) -> str | None:
    """A queue URL that is not on amazonaws.com names its own endpoint (LocalStack, an emulator).

    With no AWS_ENDPOINT_URL, a real AWS queue URL means real AWS (boto3 picks the endpoint).
    """
    parts = urlsplit(queue_url)
    if not parts.scheme or not parts.netloc or parts.hostname is None:
        raise ConfigError(f"SQS_QUEUE_URL is not a URL: {queue_url!r}")
    if parts.hostname.endswith(".amazonaws.com") or parts.hostname.endswith(".amazonaws.com.cn"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ***, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
