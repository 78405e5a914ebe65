"""The sink's rate (bench/run.py's scenario 4) of this checkout beside another revision's, in one run.

    PYTHONPATH=scripts .venv/bin/python -m bench.sink_versus [--baseline main] [--runs 5] [--sink-count 100000]

The baseline is `git archive <rev>` unpacked in a temporary directory. Each run times the sink of
bench/run.py (scenario 4: the ETL's Pipeline over in-memory messages, COPY into PostgreSQL; its bare
COPYs left out) and the ETL process's CPU per message (on a shared machine steadier than the wall rate), of
both, alternately (baseline first, then this checkout, then the other way round), in child
processes with the same interpreter and the same bodies, each on a fresh database, so drift and the
load of a shared machine hit both alike. Prints each run, the medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from bench.scenarios import add_service_arguments, write_section

ROOT = Path(__file__).resolve().parents[1]
# Run in the child: the sink of bench.scenarios.sink (its bare COPYs left out), over --sink-count bodies
# of the shared generator; prints rows/s and the ETL process's CPU microseconds per message.
_CHILD = """
import sys, time, uuid
from bench.run import SEED, etl_defaults
from bench.scenarios import Services, fresh_database
from config import PipelineOptions
from database.sqs_postgres import PostgresWriter
from models import ReceivedMessage
from pii.masking import Masker, decode_key
try:
    from etl.pipeline import Pipeline
except ImportError:  # a revision before the etl/ package
    from pipeline import Pipeline
from sample_data import generate
from tests.fakes import MemoryQueue

count, endpoint, admin = int(sys.argv[1]), sys.argv[2], sys.argv[3]
services = Services.for_emulator(endpoint, admin)
receivers, _deleters, batch_size, flush_seconds = etl_defaults()
sent_ms = int(time.time() * 1000)
messages = [
    ReceivedMessage(message_id=str(uuid.uuid4()), receipt_handle=str(n), body=body, sent_timestamp_ms=sent_ms)
    for n, body in enumerate(generate(count, SEED))
]
with fresh_database(services) as dsn:
    source = MemoryQueue(messages)
    writer = PostgresWriter(dsn)
    writer.connect()
    options = PipelineOptions(receivers=receivers, batch_size=batch_size, flush_seconds=flush_seconds)
    try:
        began, cpu = time.perf_counter(), time.process_time()
        stats = Pipeline(source, writer, Masker(decode_key(services.masking_key)), options).run()
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    finally:
        writer.close()
ok = stats.loaded + stats.rejected == count == source.deleted
print(f"{count / seconds:.0f} {cpu / count * 1e6:.1f} {'OK' if ok else 'MISMATCH'} {stats.loaded} loaded")
"""


def _unpack(revision: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as file:
        file.write(archive)
        file.seek(0)
        with tarfile.open(fileobj=file) as tar:
            tar.extractall(into, filter="data")


def _sink_rate(tree: Path, args: argparse.Namespace) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'scripts'}"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(args.sink_count), args.endpoint_url, args.database_url],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    rate, cpu, check = done.stdout.strip().splitlines()[-1].split(" ", 2)
    return float(rate), float(cpu), check


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; exit 1 if a sink lost or duplicated a message."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="the git revision to compare with (main)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each (5)")
    parser.add_argument("--sink-count", type=int, default=100_000, help="messages through each sink (100000)")
    add_service_arguments(parser)
    parser.add_argument("--markdown", metavar="PATH", default=None, help="also write the report as a section of PATH")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    rates: dict[str, list[float]] = {"baseline": [], "this": []}
    cpus: dict[str, list[float]] = {"baseline": [], "this": []}
    ok = True
    say(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="sink-baseline-") as tmp:
        _unpack(args.baseline, Path(tmp))
        trees = {"baseline": Path(tmp), "this": ROOT}
        for run in range(1, args.runs + 1):
            order = ("baseline", "this") if run % 2 else ("this", "baseline")
            for name in order:
                rate, cpu, check = _sink_rate(trees[name], args)
                ok = ok and check.startswith("OK")
                rates[name].append(rate)
                cpus[name].append(cpu)
                say(f"run {run} {name:8}: {rate:,.0f} rows/s, {cpu:.1f} µs CPU/message; {check}")
    base, this = statistics.median(rates["baseline"]), statistics.median(rates["this"])
    say(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(
        f"median sink rate: {args.baseline} {base:,.0f} rows/s, this checkout {this:,.0f} rows/s; "
        f"ratio {this / base:.3f}"
    )
    base_cpu, this_cpu = statistics.median(cpus["baseline"]), statistics.median(cpus["this"])
    say(
        f"median ETL CPU per message: {args.baseline} {base_cpu:.1f} µs, this checkout {this_cpu:.1f} µs; "
        f"ratio {this_cpu / base_cpu:.3f}"
    )
    if args.markdown:
        command = " ".join(["PYTHONPATH=scripts .venv/bin/python -m bench.sink_versus", *(argv or sys.argv[1:])])
        write_section(Path(args.markdown), "sink_versus", _section(command, args.baseline, lines))
    return 0 if ok else 1


def _section(command: str, baseline: str, lines: list[str]) -> list[str]:
    return [
        "## The sink beside an earlier main (`make bench-versus`)",
        "",
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: the sink (scenario 4: the",
        f"Pipeline over in-memory messages, COPY into PostgreSQL) of this checkout and of {baseline},",
        "alternately, each on a fresh database; the rate and the ETL process's CPU per message.",
        "",
        "```",
        *lines,
        "```",
    ]


if __name__ == "__main__":
    sys.exit(main())
