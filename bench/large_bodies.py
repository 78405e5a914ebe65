"""Peak RSS of the ETL over floods of large bodies, and its ordinary-body throughput beside a baseline.

    PYTHONPATH=scripts .venv/bin/python -m bench.large_bodies [--count 2000] [--sizes 1KiB,64KiB,256KiB,1MiB]
        [--ordinary-count 20000] [--runs 3] [--baseline main] [--markdown docs/benchmarks.md]

Issue 28's benchmark. Each drain is `python main.py` as a child (bench.scenarios.run_etl: wall time,
peak RSS sampled from /proc, every message checked stored once and the queue empty), on its own
uuid-named queue made with MaximumMessageSize 1 MiB (or 256 KiB where the emulator refuses 1 MiB;
larger sizes are then left out) and its own database.

  flood <size>  --count bodies of exactly <size> UTF-8 bytes: half not JSON, half valid login events
                carrying an unknown field that pads them (the issue's measured flood)
  mix           --count bodies: half ordinary logins, the rest 64 KiB (at the limit), 64 KiB - 1
                not JSON (stored whole), 256 KiB and the largest size, in turn
  ordinary      --ordinary-count ordinary logins (scripts/sample_data.py), by this checkout and by
                --baseline (a git ref, exported with `git archive` and run with this venv), in turn,
                --runs times each: throughput and peak RSS side by side

The baseline runs only the ordinary drains: before this issue a flood of 1 MiB bodies was stored
whole, ~1.4 MB a row, a batch of up to 1,000 of them in one statement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bench import scenarios
from bench.scenarios import (
    ROOT,
    Measurement,
    Services,
    add_service_arguments,
    fresh_database,
    progress,
    queue_depth,
    run_etl,
)
from config import parse_bytes
from etl.transform import DEFAULT_MAX_BODY_BYTES
from sample_data import generate, send
from tests.fakes import login

SEED = 42
MIB = 1_048_576
TARGET_PEAK_RSS_MB = 150


def padded_event(n: int, size: int) -> str:
    base = login(n, extra="")
    return login(n, extra="p" * (size - len(base)))


def not_json(n: int, size: int) -> str:
    return f"not json {n} ".ljust(size, "q")


def flood(count: int, size: int) -> list[str]:
    return [padded_event(n, size) if n % 2 else not_json(n, size) for n in range(count)]


def mix(count: int, largest: int) -> list[str]:
    ordinary = list(generate(count, SEED))
    large = [
        lambda n: padded_event(n, DEFAULT_MAX_BODY_BYTES),
        lambda n: not_json(n, DEFAULT_MAX_BODY_BYTES - 1),
        lambda n: padded_event(n, 262_144),
        lambda n: not_json(n, largest),
    ]
    return [ordinary[n] if n % 2 == 0 else large[n // 2 % 4](n) for n in range(count)]


@contextmanager
def large_queue(services: Services, bodies: Sequence[str]) -> Iterator[str]:
    """A uuid-named queue of the largest MaximumMessageSize the emulator takes, holding `bodies`."""
    sqs = services.client()
    url = create_large_queue(sqs)
    try:
        small = [b for b in bodies if len(b.encode()) <= 1024]
        big = [b for b in bodies if len(b.encode()) > 1024]
        if small:
            send(small, url, services.endpoint_url)
        if big:  # one per call: SendMessageBatch takes 1 MiB in all

            def one(body: str) -> None:
                sqs.send_message(QueueUrl=url, MessageBody=body)

            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(one, big))
        if queue_depth(sqs, url) != len(bodies):
            raise RuntimeError(f"queue {url} holds {queue_depth(sqs, url)} messages after sending {len(bodies)}")
        yield url
    finally:
        sqs.delete_queue(QueueUrl=url)


def create_large_queue(sqs: object) -> str:
    name = f"bench-{uuid.uuid4().hex}"
    try:
        return str(sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": str(MIB)})["QueueUrl"])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an emulator that refuses 1 MiB
        return str(sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "262144"})["QueueUrl"])  # type: ignore[attr-defined]


def largest_size(services: Services) -> int:
    sqs = services.client()
    url = create_large_queue(sqs)
    try:
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
        return int(attributes["Attributes"]["MaximumMessageSize"])
    finally:
        sqs.delete_queue(QueueUrl=url)


def drain(services: Services, bodies: Sequence[str], root: Path = ROOT) -> Measurement:
    with large_queue(services, bodies) as url, fresh_database(services) as dsn:
        return run_etl(services, url, dsn, sent=len(bodies), root=root)


@contextmanager
def baseline_tree(ref: str) -> Iterator[Path]:
    """`ref` of this repository exported into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        archive = Path(tmp) / "tree.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(Path(tmp) / "tree", filter="data")
        yield Path(tmp) / "tree"


def git_ref(ref: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True)
    return done.stdout.strip() or ref


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    services = Services.for_emulator(args.endpoint_url, args.database_url)
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    largest = largest_size(services)
    sizes = [s for s in (parse_bytes(t) for t in args.sizes.split(",")) if s <= largest]
    lines = [
        f"large bodies, {started:%Y-%m-%d %H:%M} UTC; this checkout git {git_ref('HEAD')}, baseline "
        f"{args.baseline} = git {git_ref(args.baseline)}; queues' MaximumMessageSize {largest:,}",
        f"floods of {args.count:,} messages per size (half not JSON, half valid events padded by an unknown field);"
        f" ordinary drains of {args.ordinary_count:,}, {args.runs} runs each, medians",
        "",
        f"{'drain':<36} {'msgs/s':>8} {'wall s':>7} {'peak RSS':>9}  check",
    ]
    failed, peaks = _floods(services, args, sizes, largest, lines)
    ours, theirs = _ordinary_runs(services, args)
    failed = _ordinary_rows(args, ours, theirs, lines) or failed
    ratio = statistics.median(m.rate for m in ours) / statistics.median(m.rate for m in theirs)
    worst = max(peaks)
    lines += [
        "",
        f"peak RSS, worst flood or mix: {worst:.0f} MB   target <= {TARGET_PEAK_RSS_MB} MB   "
        + ("PASS" if worst <= TARGET_PEAK_RSS_MB else "MISS"),
        f"ordinary throughput, this / baseline: {ratio:.2f} (noise on a shared machine: about +-10%)",
        f"finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC after "
        f"{(datetime.now(timezone.utc) - started).total_seconds() / 60:.1f} min; load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 cores shared with other work)",
    ]
    print("\n".join(lines))
    if args.markdown:
        command = " ".join(["PYTHONPATH=scripts .venv/bin/python -m bench.large_bodies", *(argv or sys.argv[1:])])
        write_section(Path(args.markdown), lines, command)
    return 1 if failed else 0


def _floods(
    services: Services, args: argparse.Namespace, sizes: list[int], largest: int, lines: list[str]
) -> tuple[bool, list[float]]:
    """The floods of each size and the mix, a row each in `lines`: whether any failed, the peaks (MB)."""
    failed = False

    def row(label: str, result: Measurement) -> None:
        nonlocal failed
        failed = failed or not (result.check or "").startswith("OK")
        line = (
            f"{label:<36} {result.rate:>8,.0f} {result.seconds:>7.1f} "
            f"{(result.rss_kb or 0) / 1024:>6.0f} MB  {result.check}"
        )
        lines.append(line)
        progress(line)

    peaks: list[float] = []
    for size in sizes:
        result = drain(services, flood(args.count, size))
        peaks.append((result.rss_kb or 0) / 1024)
        row(f"flood of {_size(size)} bodies (this)", result)
    result = drain(services, mix(args.count, largest))
    peaks.append((result.rss_kb or 0) / 1024)
    row(f"mix up to {_size(largest)} (this)", result)
    return failed, peaks


def _ordinary_runs(services: Services, args: argparse.Namespace) -> tuple[list[Measurement], list[Measurement]]:
    """The ordinary drains, this checkout's and the baseline's alternating."""
    ordinary = list(generate(args.ordinary_count, SEED))
    ours: list[Measurement] = []
    theirs: list[Measurement] = []
    with baseline_tree(args.baseline) as base:
        for run in range(args.runs):
            ours.append(drain(services, ordinary))
            progress(f"ordinary run {run + 1} (this): {ours[-1].rate:,.0f} msgs/s")
            theirs.append(drain(services, ordinary, root=base))
            progress(f"ordinary run {run + 1} (baseline): {theirs[-1].rate:,.0f} msgs/s")
    return ours, theirs


def _ordinary_rows(
    args: argparse.Namespace, ours: list[Measurement], theirs: list[Measurement], lines: list[str]
) -> bool:
    """A row each for the ordinary drains in `lines`; whether any failed."""
    failed = False
    for label, runs in (
        (f"ordinary (this, git {git_ref('HEAD')})", ours),
        (f"ordinary (baseline {args.baseline})", theirs),
    ):
        rates = [m.rate for m in runs]
        each = " ".join(f"{r:,.0f}" for r in rates)
        rss = statistics.median((m.rss_kb or 0) / 1024 for m in runs)
        ok = all((m.check or "").startswith("OK") for m in runs)
        failed = failed or not ok
        lines.append(
            f"{label:<36} {statistics.median(rates):>8,.0f} {statistics.median(m.seconds for m in runs):>7.1f} "
            f"{rss:>6.0f} MB  {'OK' if ok else 'MISMATCH'} (runs: {each})"
        )
    return failed


def write_section(path: Path, lines: list[str], command: str) -> None:
    """Put the report in its own section of `path`, replacing the one there (bench.run keeps it)."""
    section = [
        "## Large bodies and memory (issue 28)",
        "",
        f"Generated by `{command}`. Peak RSS of `python main.py` (defaults: `--max-body-bytes 64KiB`,",
        "`--max-bytes-in-hand 32MiB`) over floods of large bodies, and its throughput on ordinary bodies",
        "beside the baseline's, drains alternating, on one machine. No test asserts a time or a size.",
        "",
        "```",
        *lines,
        "```",
    ]
    scenarios.write_section(path, "large_bodies", section)


def _size(size: int) -> str:
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size // 1024} KiB"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="messages per flood (2000)")
    parser.add_argument("--sizes", default="1KiB,64KiB,256KiB,1MiB", help="body sizes of the floods")
    parser.add_argument("--ordinary-count", type=int, default=20_000, help="ordinary messages per drain (20000)")
    parser.add_argument("--runs", type=int, default=3, help="ordinary drains by each of this and the baseline (3)")
    parser.add_argument("--baseline", default="main", help="git ref run beside this checkout (main)")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="write the report into PATH's section")
    add_service_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
