"""Where a py-spy sample of the ETL goes: the phase of the innermost frame that names one (bench.cpu's --profile)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Phases of a sample. The innermost frame of a package we can name (botocore, boto3, urllib3, our
# modules) owns the sample: standard-library frames under it (json, email, hashlib's callers,
# http.client) are charged to it, so botocore's header objects count as signing when the signer
# builds them. The first rule whose pattern is in the owner's file name decides.
LIBRARIES = ("botocore/", "boto3/", "urllib3/")  # py-spy names a file relative to its sys.path entry
OURS = tuple(p.name for p in ROOT.glob("*.py")) + ("aws/", "pii/", "database/")
HTTP_STDLIB = ("http/client.py", "socket.py", "ssl.py", "selectors.py")
PHASES: list[tuple[str, tuple[str, ...]]] = [
    ("signing (SigV4, credentials)", ("botocore/auth.py", "botocore/signers.py", "botocore/credentials.py")),
    ("serialising", ("botocore/serialize.py",)),
    ("parameter validation", ("botocore/validate.py",)),
    ("endpoint resolution", ("botocore/regions.py", "botocore/endpoint_provider.py")),
    ("parsing the answer", ("botocore/parsers.py",)),
    (
        "event hooks, retries, user agent",
        (
            "botocore/hooks.py",
            "botocore/handlers.py",
            "botocore/retries/",
            "botocore/retryhandler.py",
            "botocore/useragent.py",
        ),
    ),
    (
        "HTTP (connection, headers, socket)",
        ("urllib3/", "botocore/httpsession.py", "botocore/awsrequest.py", "botocore/endpoint.py"),
    ),
    ("other botocore (client, model, utils)", ("botocore/", "boto3/")),
    ("narrow transport: request, answer", ("aws/sqs_json.py", "aws/http_answer.py")),
    ("ours: parse + mask", ("etl/transform.py", "pii/", "models.py")),
    ("ours: COPY + commit (psycopg2)", ("database/", "etl/commit.py")),
    (
        "ours: loop, reader, retries, metrics",
        ("etl/", "aws/", "main.py", "cli/"),
    ),
]
STARTUP = "start-up and shut-down (main thread outside the loop)"
INDEXER = "token indexer thread (not per message)"
UNOWNED = "threads, queues, locks, other stdlib"


def phases(raw: Path) -> Counter[str]:
    """py-spy's raw (collapsed) stacks, each sample put in its phase."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack.strip() or not number.isdigit():  # no Python frame (native code, idle)
            continue
        frames = stack.split(";")
        if frames[0].startswith("<module> (main.py") and not any("Pipeline.run" in f for f in frames):
            counts[STARTUP] += int(number)  # the main thread before and after the loop
        elif any("TokenIndexer" in frame for frame in frames):
            counts[INDEXER] += int(number)
        else:
            counts[_phase(frames)] += int(number)
    return counts


def _phase(frames: list[str]) -> str:
    inner: list[str] = []
    for frame in reversed(frames):  # innermost first
        where = frame.rsplit("(", 1)[-1]
        if _owned(where):
            for name, patterns in PHASES:
                if any(p in where for p in patterns):
                    if name.startswith("narrow") and any(h in f for f in inner for h in HTTP_STDLIB):
                        return "HTTP (connection, headers, socket)"
                    return name
        inner.append(where)
    return UNOWNED


def _owned(where: str) -> bool:
    return where.startswith(LIBRARIES) or where.startswith(OURS)
