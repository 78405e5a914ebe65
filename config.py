"""Settings: every knob the ETL reads from its environment, validated once at start."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from psycopg2 import ProgrammingError
from psycopg2.extensions import make_dsn, parse_dsn

from aws.limits import BATCH_LIMIT, MAX_MESSAGE_BYTES
from etl.transform import DEFAULT_MAX_BODY_BYTES
from models import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS
from pii.keys import (
    KeySource,
    KeySourceError,
    KmsWrappedKeys,
    StaticKeys,
    decode_key_text,
    decode_keyring,
    decode_wrapped,
    read_key_file,
)
from pii.masking import InvalidKey, Masker, decode_key

DEFAULT_QUEUE_URL = "http://localhost:4566/000000000000/login-queue"
DEFAULT_DATABASE_URL = "postgresql://postgres:postgres@localhost:5432/postgres"
# A connection string is a line; a file much larger than that is not one (a wrong path).
MAX_DATABASE_URL_FILE_BYTES = 8192
DEFAULT_REGION = "us-east-1"
KEY_HELP = "create one with `python main.py keygen` and put it in .env as MASKING_KEY=<key>"
# The key sources, exactly one of which must be set (docs/keys-and-privacy.md "Where the key comes from").
KEY_SOURCES = ("MASKING_KEY", "MASKING_KEY_FILE", "MASKING_KEY_KMS_CIPHERTEXT", "MASKING_KEYS", "MASKING_KEYSET")
# SQS_CLIENT: how receive/delete/visibility calls reach SQS (aws.sqs.TRANSPORTS; the first is the default).
SQS_CLIENTS = ("json", "boto3")
# Settings botocore honours and the narrow path does not: with one set, SQS_CLIENT defaults to boto3.
BOTO3_ONLY_SETTINGS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


# The consume loop's defaults, measured on a 2-core machine with the embedded LocalStack (see bench/ and README).
DEFAULT_RECEIVERS = 8
DEFAULT_DELETERS = 8
DEFAULT_BATCH_SIZE = 1000
DEFAULT_FLUSH_SECONDS = 0.5
# The bound on bytes in hand (MAX_BYTES_IN_HAND, --max-bytes-in-hand): bodies received and not yet
# committed, and each receive's answer while it is read and prepared (its Content-Length on the JSON
# transport; 10 messages of the queue's MaximumMessageSize on boto3's, which cannot see it first).
# Sized for the Kubernetes example's 256 Mi limit: peak RSS stays under ~150 MB
# (docs/kubernetes.md "Sizing memory"): with 1 MiB messages, 3 answers of ten at once. At least one
# full receive of the largest SQS messages.
SQS_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES
DEFAULT_MAX_BYTES_IN_HAND = 32 * 1_048_576
MIN_MAX_BYTES_IN_HAND = BATCH_LIMIT * SQS_MAX_MESSAGE_BYTES
MIN_MAX_BODY_BYTES = 1024
# Below the 30 s grace period of Compose and Kubernetes before they send SIGKILL.
DEFAULT_STOP_TIMEOUT_SECONDS = 20.0
# The liveness probe (/livez) fails once the consume loop has neither turned nor retried a call for
# this long: far above any one call's timeouts, so only a stuck process is restarted (see Health).
LIVENESS_STALL_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """How the loop runs; defaults measured on a 2-core machine (see bench/)."""

    follow: bool = False
    receivers: int = DEFAULT_RECEIVERS
    deleters: int = DEFAULT_DELETERS
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    retry_budget_seconds: float = 60.0
    stop_timeout_seconds: float = DEFAULT_STOP_TIMEOUT_SECONDS
    backoff_base_seconds: float = DEFAULT_BASE_SECONDS
    backoff_cap_seconds: float = DEFAULT_CAP_SECONDS
    # The queue's VisibilityTimeout: messages held longer than about half of it are extended.
    visibility_timeout_seconds: int = 30
    # A message whose processing raised an unexpected error is left for redelivery; from this
    # many receives on it is quarantined instead (kept below the RedrivePolicy's maxReceiveCount).
    max_receives: int = 5
    # The size policy: larger bodies are quarantined unparsed (transform.reject_too_large).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The bound on bytes in hand (see DEFAULT_MAX_BYTES_IN_HAND); a batch is cut at half of it.
    max_bytes_in_hand: int = DEFAULT_MAX_BYTES_IN_HAND
    # The queue's MaximumMessageSize: one receive is counted at 10 times this until it returns.
    max_message_bytes: int = SQS_MAX_MESSAGE_BYTES
    # The queue is FIFO (its FifoQueue attribute): a message group in flight holds its next messages
    # back, so a drain's empty receive ends it only once this process holds no message.
    fifo: bool = False


class ConfigError(Exception):
    """Raised when the environment is incomplete or malformed; the text says how to fix it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration. Secrets are excluded from the repr."""

    queue_url: str
    database_url: str = field(repr=False)  # may carry a password
    key_source: KeySource  # its repr names the source and versions, never a key
    key_version: int  # the active version: new tokens are made with it
    endpoint_url: str | None
    region: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_bytes_in_hand: int = DEFAULT_MAX_BYTES_IN_HAND
    sqs_client: str = SQS_CLIENTS[0]
    ca_bundle: str | None = None  # AWS_CA_BUNDLE: botocore reads it itself; the narrow path is told

    def load_masker(self) -> Masker:
        """The keyring from the configured source, its active version set; KMS-wrapped keys are
        decrypted here (raises MaskingError, or KmsUnavailable)."""
        return Masker.from_keys(self.key_source.load(), active=self.key_version)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build Settings from a mapping such as os.environ; raise ConfigError."""
        queue_url = env.get("SQS_QUEUE_URL") or DEFAULT_QUEUE_URL
        endpoint_url = env.get("AWS_ENDPOINT_URL_SQS") or env.get("AWS_ENDPOINT_URL") or _endpoint_of(queue_url)
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        source = key_source_from_env(env)
        sqs_client = _sqs_client(env)
        return cls(
            queue_url=queue_url,
            database_url=database_url_from_env(env),
            key_source=source,
            key_version=_active_version(env, source),
            endpoint_url=endpoint_url,
            region=region,
            max_body_bytes=byte_count(
                "MAX_BODY_BYTES", env.get("MAX_BODY_BYTES", ""), DEFAULT_MAX_BODY_BYTES, MIN_MAX_BODY_BYTES
            ),
            max_bytes_in_hand=byte_count(
                "MAX_BYTES_IN_HAND", env.get("MAX_BYTES_IN_HAND", ""), DEFAULT_MAX_BYTES_IN_HAND, MIN_MAX_BYTES_IN_HAND
            ),
            sqs_client=sqs_client,
            ca_bundle=env.get("AWS_CA_BUNDLE", "").strip() or None,
        )


def _sqs_client(env: Mapping[str, str]) -> str:
    """SQS_CLIENT, checked; unset, `json` unless a proxy is configured, which only the boto3 client
    honours (the narrow path would go around it)."""
    needs_boto3 = [name for name in BOTO3_ONLY_SETTINGS if env.get(name, "").strip()]
    wanted = env.get("SQS_CLIENT", "").strip().lower()
    if not wanted:
        return "boto3" if needs_boto3 else SQS_CLIENTS[0]
    if wanted not in SQS_CLIENTS:
        raise ConfigError(
            f"SQS_CLIENT must be one of {', '.join(SQS_CLIENTS)}, got {env.get('SQS_CLIENT')!r} "
            "(json: the narrow signed path for the hot calls; boto3: the boto3 client for every call)"
        )
    if wanted == "json" and needs_boto3:
        raise ConfigError(
            f"SQS_CLIENT=json does not honour {', '.join(needs_boto3)}: set SQS_CLIENT=boto3 (or leave it unset)"
        )
    return wanted


@dataclass(frozen=True, slots=True)
class KmsSettings:
    """Where KMS is: `AWS_ENDPOINT_URL_KMS`, else `AWS_ENDPOINT_URL`, else real AWS."""

    endpoint_url: str | None
    region: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KmsSettings:
        """Build from a mapping such as os.environ (no key needed: `keygen --kms-key-id` uses it)."""
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_KMS") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        )


def key_source_from_env(env: Mapping[str, str]) -> KeySource:
    """The one key source that is set; raise ConfigError naming the variables when none or several are."""
    values = {
        "MASKING_KEY": env.get("MASKING_KEY", ""),
        "MASKING_KEY_FILE": env.get("MASKING_KEY_FILE", ""),
        "MASKING_KEY_KMS_CIPHERTEXT": env.get("MASKING_KEY_KMS_CIPHERTEXT", ""),
        "MASKING_KEYS": env.get("MASKING_KEYS", ""),
        "MASKING_KEYSET": env.get("MASKING_KEYSET", ""),
    }
    present = [name for name in KEY_SOURCES if values[name].strip()]
    if not present:
        others = ", ".join(KEY_SOURCES[1:])
        raise ConfigError(f"MASKING_KEY is not set (nor {others}): {KEY_HELP}")
    if len(present) > 1:
        raise ConfigError(
            f"several key sources are set ({', '.join(present)}): set exactly one of them (.env counts too)"
        )
    name = present[0]
    value = values[name]
    try:
        if name == "MASKING_KEY":
            return StaticKeys(name, {1: decode_key(value)})
        if name == "MASKING_KEYS":
            return StaticKeys(name, decode_keyring(value))
        if name == "MASKING_KEYSET":
            keys, primary = decode_key_text(value)
            if primary is None:
                raise InvalidKey("not a Tink JSON keyset (use MASKING_KEYS for version:key pairs)")
            return StaticKeys(name, keys, primary)
        if name == "MASKING_KEY_FILE":
            return StaticKeys(f"{name} {value.strip()}", *read_key_file(value.strip()))
        kms = KmsSettings.from_env(env)
        return KmsWrappedKeys(
            name,
            decode_wrapped(value),
            region=kms.region,
            endpoint_url=kms.endpoint_url,
            key_id=env.get("MASKING_KEY_KMS_KEY_ID") or None,
        )
    except InvalidKey as exc:
        raise ConfigError(f"{name} is malformed ({exc}): {KEY_HELP}") from None
    except KeySourceError as exc:
        raise ConfigError(f"{name}: {exc}") from None


_BYTE_UNITS = {"": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_bytes(text: str) -> int:
    """A byte count: `65536`, `64KiB`, `48MiB` (binary units); raise ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]iB)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a byte count: {text!r} (a number of bytes, or with KiB, MiB or GiB)")
    return int(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").upper()]


def byte_count(name: str, raw: str, default: int, minimum: int) -> int:
    """The byte count `raw` of variable `name` (default when empty), at least `minimum`; raise ConfigError."""
    raw = raw.strip()
    if not raw:
        return default
    try:
        value = parse_bytes(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum} bytes, got {value}")
    return value


def _active_version(env: Mapping[str, str], source: KeySource) -> int:
    """MASKING_KEY_VERSION; required when the keyring holds several versions, unless a keyset names its primary."""
    versions = source.versions
    raw = env.get("MASKING_KEY_VERSION", "").strip()
    if source.primary is not None:
        if raw and raw != str(source.primary):
            raise ConfigError(
                f"MASKING_KEY_VERSION={raw} but the keyset's primary key id is {source.primary}: "
                "unset MASKING_KEY_VERSION (the keyset's primary decides) or make that key primary"
            )
        return source.primary
    if not raw:
        if len(versions) > 1:
            raise ConfigError(
                f"MASKING_KEY_VERSION is not set: the keyring holds versions "
                f"{', '.join(map(str, versions))}; set it to the one new tokens should use"
            )
        return versions[0]
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"MASKING_KEY_VERSION must be a positive integer, got {raw!r}")
    if int(raw) not in versions:
        raise ConfigError(
            f"MASKING_KEY_VERSION={raw} is not in the keyring, which holds versions {', '.join(map(str, versions))}"
        )
    return int(raw)


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


UNPARSEABLE_DSN = "(unparseable DATABASE_URL)"


class DsnError(ValueError):
    """Raised when libpq cannot parse a connection string; the text holds no part of it."""


def parse_connection_string(dsn: str) -> dict[str, str]:
    """libpq's own reading of a URI or keyword DSN; raise DsnError with libpq's reason, input removed."""
    try:
        return parse_dsn(dsn)
    except ProgrammingError as exc:
        # libpq quotes the offending fragment ("invalid percent-encoded token: \"50%zz…\""), which
        # may be the password: drop everything from the first quote to the last.
        reason = re.sub(r'".*"', "…", str(exc).strip(), flags=re.S).removeprefix("invalid dsn: ")
        raise DsnError(reason) from None


def redact_dsn(dsn: str) -> str:
    """Host, port, database and user of a DSN as a URI, for messages and logs; never a password.

    The DSN is read by libpq's own parser, so a password in the URI, in `?password=`, or in a
    keyword string (`host=… password=…`) is never shown; a DSN libpq cannot parse is shown as
    "(unparseable DATABASE_URL)".
    """
    try:
        parts = parse_connection_string(dsn)
    except DsnError:
        return UNPARSEABLE_DSN
    user = f"{quote(parts['user'], safe='')}@" if parts.get("user") else ""
    hosts = parts.get("host", "").split(",") if parts.get("host") else []
    ports = parts.get("port", "").split(",") if parts.get("port") else []
    if len(ports) == 1 and len(hosts) > 1:
        ports *= len(hosts)  # libpq: one port applies to every host
    where = []
    for i in range(max(len(hosts), len(ports))):
        host = hosts[i] if i < len(hosts) else ""
        host = f"[{host}]" if ":" in host else quote(host, safe="")  # IPv6, or a socket directory
        port = f":{ports[i]}" if i < len(ports) and ports[i] else ""
        where.append(host + port)
    database = f"/{quote(parts['dbname'], safe='')}" if parts.get("dbname") else ""
    return f"postgresql://{user}{','.join(where)}{database}"


def database_url_from_env(env: Mapping[str, str]) -> str:
    """DATABASE_URL, or the contents of the file DATABASE_URL_FILE names (a secret mounted as a file:
    not in the process's environment, so not in /proc/<pid>/environ); raise ConfigError."""
    path = env.get("DATABASE_URL_FILE")
    if not path:
        return _database_url(env.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    if env.get("DATABASE_URL"):
        raise ConfigError("both DATABASE_URL and DATABASE_URL_FILE are set: set one")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(MAX_DATABASE_URL_FILE_BYTES + 1).strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"DATABASE_URL_FILE {path}: cannot read it ({reason})") from None
    if not text or len(text) > MAX_DATABASE_URL_FILE_BYTES:
        raise ConfigError(f"DATABASE_URL_FILE {path}: expected one libpq connection string, found none or too much")
    return _database_url(text)


def _database_url(dsn: str) -> str:
    """DATABASE_URL if libpq can parse it; else ConfigError with libpq's reason, never the text."""
    try:
        parse_connection_string(dsn)
    except DsnError as exc:
        raise ConfigError(
            f"DATABASE_URL is not a valid libpq connection string ({exc}); if the password "
            "holds a special character, percent-encode it in a URI (% as %25, @ as %40) "
            "or quote it in a keyword string (password='…')"
        ) from None
    return dsn


# The fields of an RDS / Aurora credentials secret (Secrets Manager's JSON) and their libpq names.
_SECRET_FIELDS = {"host": "host", "port": "port", "dbname": "dbname", "username": "user", "password": "password"}


def database_url_with_secret(base: str | None, secret: str) -> str:
    """The DSN from a Secrets Manager secret, over `base` (DATABASE_URL, may be None); raise ConfigError.

    The secret is either a libpq connection string (URI or keywords), used as it is, or the JSON of
    an RDS credentials secret (`username`, `password`, and optionally `host`, `port`, `dbname`),
    whose fields override those of `base`: an RDS-managed master secret holds only the user and
    password, and DATABASE_URL says where (`host=… dbname=… sslmode=verify-full`). Messages never
    quote the secret.
    """
    text = secret.strip()
    if not text.startswith("{"):
        return _database_url(text)
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(
            "the database secret looks like JSON but does not parse; store a JSON object "
            "with username and password, or a libpq connection string"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("username", "password")):
        raise ConfigError("the database secret's JSON lacks username or password (RDS credentials format)")
    fields = {libpq: str(data[name]) for name, libpq in _SECRET_FIELDS.items() if data.get(name) not in (None, "")}
    try:
        return _database_url(make_dsn(_database_url(base) if base else None, **fields))
    except ProgrammingError:
        raise ConfigError(
            "DATABASE_URL cannot be combined with the database secret; write it as a libpq connection string"
        ) from None
