"""The measured scenarios of bench/run.py, and the throw-away queues and databases they use.

Every scenario gets its own uuid-named queue and its own database (``bench_<uuid>``), both
removed afterwards, so a benchmark never touches the user's queue or the `postgres` database.
Filling a queue is never timed.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2

# Re-exported: other benchmarks (and bench.sink_versus's child, on old revisions too) import them from here.
from bench.sections import kept_sections, progress, section_markers, write_section  # noqa: F401
from bench.services import Measurement, Services, add_service_arguments  # noqa: F401
from config import PipelineOptions
from database import partitions
from database.sqs_postgres import PostgresWriter
from etl.pipeline import Pipeline
from etl.transform import transform
from models import MaskedLogin, ReceivedMessage
from pii.masking import Masker, decode_key
from tests.fakes import MemoryQueue

try:
    from sample_data import send
except ModuleNotFoundError:  # scripts/ is an import root, as pytest's pythonpath has it (pyproject.toml)
    raise SystemExit(
        "bench: run it from the repository root with scripts/ on the path: "
        "PYTHONPATH=scripts .venv/bin/python -m bench.run --help (docs/CONTRIBUTING.md)"
    ) from None

ROOT = Path(__file__).resolve().parent.parent
RECEIVE_MAX_MESSAGES = 10  # ReceiveMessage / DeleteMessageBatch limit
COPY_REPEAT = 5  # the bare COPYs load the rows this many times: a 20,000-row COPY is over in ~50 ms
DRAIN_WAIT_SECONDS = 1  # the ETL's drain-mode long poll; every drain stops at its first empty poll
LOGIN_COLUMNS = partitions.COLUMNS  # the table's columns, as the writer creates them
# The sink runs the pipeline in this process. It logs a warning per rejected message: the records
# are still made, their output is dropped (with no handler Python would print each one to stderr).
logging.getLogger("pipeline").addHandler(logging.NullHandler())
_SUMMARY = re.compile(r"in ([0-9.]+) s \(")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


# -- throw-away resources -----------------------------------------------------------------------


@contextmanager
def filled_queue(services: Services, bodies: Sequence[str]) -> Iterator[str]:
    """A new uuid-named queue holding `bodies`; deleted on exit. Yields its URL."""
    sqs = services.client()
    url = sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex}")["QueueUrl"]
    try:
        send(list(bodies), url, services.endpoint_url)
        if queue_depth(sqs, url) != len(bodies):
            raise RuntimeError(f"queue {url} holds {queue_depth(sqs, url)} messages after sending {len(bodies)}")
        yield url
    finally:
        sqs.delete_queue(QueueUrl=url)


def queue_depth(sqs: Any, url: str) -> int:
    """Visible plus in-flight messages of a queue."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes.get(name, 0)) for name in names)


@contextmanager
def fresh_database(services: Services) -> Iterator[str]:
    """A new empty database ``bench_<uuid>`` on the same server; dropped on exit. Yields its DSN."""
    name = f"bench_{uuid.uuid4().hex}"
    _admin(services.admin_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(services.admin_dsn)._replace(path=f"/{name}"))
    finally:
        _admin(services.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


@contextmanager
def latency_proxy(endpoint_url: str, latency_ms: float) -> Iterator[str]:
    """Run bench/latency_proxy.py in its own process; yield its endpoint URL."""
    upstream = urlsplit(endpoint_url)
    host = "127.0.0.1" if upstream.hostname in (None, "localhost") else upstream.hostname
    command = [
        sys.executable,
        str(ROOT / "bench" / "latency_proxy.py"),
        "--latency-ms",
        str(latency_ms),
        "--upstream",
        f"{host}:{upstream.port or 80}",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"latency proxy did not start (said {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[-1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def via(queue_url: str, endpoint_url: str) -> str:
    """The queue URL with its host:port replaced by the endpoint's (e.g. the latency proxy)."""
    return urlunsplit(urlsplit(queue_url)._replace(netloc=urlsplit(endpoint_url).netloc))


# -- 1. the limit: bare drain ---------------------------------------------------------------------


def bare_drain(services: Services, queue_url: str, threads: int, endpoint_url: str | None = None) -> Measurement:
    """`threads` threads each receive 10 + DeleteMessageBatch until an empty poll; nothing else."""
    clients = [services.client(endpoint_url) for _ in range(threads)]  # Session.client is not thread-safe
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def drain(index: int) -> None:
        sqs = clients[index]
        start.wait()
        while True:
            messages = sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=RECEIVE_MAX_MESSAGES, WaitTimeSeconds=DRAIN_WAIT_SECONDS
            ).get("Messages", [])
            if not messages:
                return
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            counts[index] += len(messages)

    workers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return Measurement(items=sum(counts), seconds=time.perf_counter() - began)


# -- 2. ours: python main.py ----------------------------------------------------------------------


def run_etl(
    services: Services,
    queue_url: str,
    dsn: str,
    sent: int,
    endpoint_url: str | None = None,
    timeout_seconds: float = 900.0,
    *,
    root: Path = ROOT,
    args: Sequence[str] = (),
) -> Measurement:
    """Run `python main.py` (drain mode, CLI defaults) as a child; time it, take its peak RSS, verify.

    `root`: the checkout whose main.py runs (bench/large_bodies.py runs a baseline beside this one).
    """
    endpoint = endpoint_url or services.endpoint_url
    env = dict(os.environ)
    env.update(
        SQS_QUEUE_URL=via(queue_url, endpoint),
        AWS_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL_SQS=endpoint,  # read first by config.py and boto3; must not point elsewhere
        DATABASE_URL=dsn,
        MASKING_KEY=services.masking_key,
        AWS_DEFAULT_REGION=services.region,
    )
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(root / "main.py"), *args], cwd=root, env=env, stdout=out, stderr=err
        )
        killer = threading.Timer(timeout_seconds, proc.kill)
        killer.start()
        try:
            peak_kb = _peak_rss_kb(proc)
        finally:
            killer.cancel()
        seconds = time.perf_counter() - began
        out.seek(0)
        summary = out.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode("utf-8", "replace").strip()[-500:]
            raise RuntimeError(f"main.py exited with {proc.returncode}: {tail}")
    match = _SUMMARY.search(summary)
    loaded, rejected = stored_counts(dsn)
    left = queue_depth(services.client(), queue_url)
    verdict = "OK" if loaded + rejected == sent and left == 0 else "MISMATCH"
    check = f"{verdict}: {loaded} rows + {rejected} rejected = {loaded + rejected} of {sent} sent, {left} left in queue"
    return Measurement(
        items=sent, seconds=seconds, rss_kb=peak_kb, inner_seconds=float(match.group(1)) if match else None, check=check
    )


def _peak_rss_kb(proc: subprocess.Popen[bytes]) -> int:
    """The child's peak RSS (VmHWM), sampled every 20 ms until it exits.

    Not wait4's ru_maxrss: Linux carries the parent's high-water mark across fork + exec into the
    child's maxrss, so a large benchmark process would inflate the figure (measured: 135-157 MB
    reported for a child whose own VmHWM was ~65 MB).
    """
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass  # exited between poll() and open()
        time.sleep(0.02)
    return peak


def stored_counts(dsn: str) -> tuple[int, int]:
    """(rows in user_logins, rows in user_logins_rejected) of the database at `dsn`."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT (SELECT count(*) FROM user_logins), (SELECT count(*) FROM user_logins_rejected)")
            row = cur.fetchone()
            assert row is not None
            loaded, rejected = row
        return int(loaded), int(rejected)
    finally:
        conn.close()


# -- 3. the naive per-message loop ----------------------------------------------------------------


def naive_loop(services: Services, queue_url: str, dsn: str, endpoint_url: str | None = None) -> Measurement:
    """One thread: receive 10; per message parse, mask, INSERT + COMMIT, DeleteMessage."""
    PostgresWriter(dsn).connect()  # the same schema as the ETL's (its connection is dropped at once)
    masker = Masker(decode_key(services.masking_key))
    sqs = services.client(endpoint_url)
    conn = psycopg2.connect(dsn)
    insert = f"INSERT INTO user_logins ({', '.join(LOGIN_COLUMNS)}) VALUES ({', '.join(['%s'] * len(LOGIN_COLUMNS))})"
    handled = 0
    try:
        began = time.perf_counter()
        while True:
            polled = time.perf_counter()
            messages = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=RECEIVE_MAX_MESSAGES,
                WaitTimeSeconds=DRAIN_WAIT_SECONDS,
                MessageSystemAttributeNames=["SentTimestamp"],
            ).get("Messages", [])
            if not messages:
                break
            for message in messages:
                sent_ms = int(message.get("Attributes", {}).get("SentTimestamp", time.time() * 1000))
                received = ReceivedMessage(message["MessageId"], message["ReceiptHandle"], message["Body"], sent_ms)
                row = transform(received, masker)
                if isinstance(row, MaskedLogin):  # a rejection: the typical loop logs and drops it
                    with conn.cursor() as cur:
                        cur.execute(insert, [getattr(row, name) for name in LOGIN_COLUMNS])
                    conn.commit()
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                handled += 1
        ended = time.perf_counter()
        return Measurement(items=handled, seconds=ended - began, tail_seconds=ended - polled)
    finally:
        conn.close()


# -- 4. the sink alone, and the database's own COPY limit -----------------------------------------


def sink(
    services: Services, bodies: Sequence[str], dsn: str, receivers: int, batch_size: int, flush_seconds: float
) -> tuple[Measurement, Measurement, Measurement]:
    """Time the ETL's Pipeline (parse, validate, mask, COPY, commit) over in-memory messages, then bare COPYs.

    Returns (sink, bare COPY of pre-formatted text, bare COPY including the formatting of rows).
    """
    masker = Masker(decode_key(services.masking_key))
    sent_ms = int(time.time() * 1000)
    messages = [
        ReceivedMessage(message_id=str(uuid.uuid4()), receipt_handle=str(n), body=body, sent_timestamp_ms=sent_ms)
        for n, body in enumerate(bodies)
    ]
    source = MemoryQueue(messages)
    writer = PostgresWriter(dsn)
    writer.connect()
    options = PipelineOptions(receivers=receivers, batch_size=batch_size, flush_seconds=flush_seconds)
    try:
        began = time.perf_counter()
        stats = Pipeline(source, writer, masker, options).run()
        sink_seconds = time.perf_counter() - began
    finally:
        writer.close()
    stored = _stored_logins(dsn)
    check = (
        f"OK {stats.loaded:,} loaded + {stats.rejected:,} rejected, {source.deleted:,} deleted"
        if stats.loaded + stats.rejected == len(messages) == source.deleted
        else f"MISMATCH {stats.loaded + stats.rejected:,} stored, {source.deleted:,} deleted of {len(messages):,}"
    )
    return (
        Measurement(items=len(messages), seconds=sink_seconds, check=check),
        bare_copy(dsn, stored, batch_size, preformatted=True),
        bare_copy(dsn, stored, batch_size, preformatted=False),
    )


def _stored_logins(dsn: str) -> list[MaskedLogin]:
    """The rows the sink stored, read back for the bare COPYs."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT {', '.join(LOGIN_COLUMNS)} FROM user_logins")
            return [MaskedLogin(**dict(zip(LOGIN_COLUMNS, r, strict=True))) for r in cur.fetchall()]
    finally:
        conn.close()


def bare_copy(
    dsn: str, rows: Sequence[MaskedLogin], batch_size: int, *, preformatted: bool, repeat: int = COPY_REPEAT
) -> Measurement:
    """COPY the rows `repeat` times into a plain copy of user_logins (no keys), one commit per batch.

    With `preformatted` the COPY text is built before the clock starts (the database's own
    limit); without it, turning the rows into COPY text is timed too (what a client can push).
    """
    columns = ", ".join(LOGIN_COLUMNS)
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)] * repeat
    texts = [_copy_text(batch) for batch in batches] if preformatted else []
    table = f"copy_target_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (LIKE user_logins)")
        conn.commit()
        began = time.perf_counter()
        for index, batch in enumerate(batches):
            text = texts[index] if preformatted else _copy_text(batch)
            with conn.cursor() as cur:
                cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO(text))
            conn.commit()
        return Measurement(items=len(rows) * repeat, seconds=time.perf_counter() - began)
    finally:
        conn.close()


def _copy_text(rows: Sequence[MaskedLogin]) -> str:
    """COPY text format, every field escaped: the straightforward client-side formatting."""
    lines = []
    for row in rows:
        fields = [getattr(row, name) for name in LOGIN_COLUMNS]
        lines.append("\t".join("\\N" if f is None else str(f).translate(_COPY_ESCAPES) for f in fields))
    return "\n".join(lines) + "\n"
