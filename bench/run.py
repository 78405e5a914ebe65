"""Benchmark of the login ETL against the bare emulator, a naive loop and the database's COPY limit.

    PYTHONPATH=scripts .venv/bin/python -m bench.run [--count 20000] [--sink-count 100000] [--runs 3]
                                                        [--latency-ms 20] [--skip-latency] [--rss [--rss-count 100000]]

Needs the stack of scripts/stack.sh (an SQS emulator on :4566, PostgreSQL on :5432). Each scenario
uses its own uuid-named queue and its own database ``bench_<uuid>``, dropped afterwards. Prints the
versions used, a table of medians over --runs, the ratios, and the targets of issue 7 with
PASS/MISS. Exit code 0, or 1 if a run of the ETL lost or duplicated a message (MISMATCH).

Scenarios (each run does them in this order, so drift hits all of them alike):
  1 limit   N threads, N = the ETL's --receivers + --deleters defaults (its SQS calls in flight at
            most): receive 10 + DeleteMessageBatch, nothing else
  2 ours    `python main.py` as a child process; wall time, its own timer, peak RSS, verified counts
  3 naive   one thread: receive 10, then per message parse, mask, INSERT + COMMIT, DeleteMessage
  4 sink    the ETL's own Pipeline (receiver threads parse + mask, the writer COPYs + commits,
            deleters) over an in-memory queue of --sink-count bodies from the same generator, no
            SQS; beside it a bare COPY of the same pre-masked rows into a plain table
  5 latency 1-3 through bench/latency_proxy.py, which adds --latency-ms to every SQS request
            (naive on a tenth of the messages, its rate extrapolated)
  6 --rss   one drain of --rss-count messages by ours, for its peak RSS
  7 --cpu   bench/cpu.py: CPU (user + sys) per message of `python main.py` at steady state with
            SQS_CLIENT=json and =boto3 and of --baseline's main.py, the fixed cost of a drain, the
            Lambda handler's CPU per message; written as the page's "CPU per message" section
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import boto3
import botocore
import cryptography
import psycopg2

from bench import cpu
from bench.scenarios import (
    COPY_REPEAT,
    Measurement,
    Services,
    add_service_arguments,
    bare_drain,
    filled_queue,
    fresh_database,
    latency_proxy,
    naive_loop,
    progress,
    run_etl,
    sink,
    via,
)
from sample_data import generate

ROOT = Path(__file__).resolve().parent.parent

SEED = 42
EXIT_OK = 0
EXIT_MISMATCH = 1
# Targets of issue 7.
TARGET_OURS_VS_LIMIT = 0.9
TARGET_SINK_ROWS_PER_SECOND = 50_000
TARGET_SINK_VS_COPY = 0.4
TARGET_LATENCY_OURS_MSGS_PER_SECOND = 1_500
TARGET_LATENCY_OURS_VS_NAIVE = 20
TARGET_PEAK_RSS_MB = 150
RECEIVE_BATCH = 10  # the naive subset is at least one receive


def etl_defaults() -> tuple[int, int, int, float]:
    """(--receivers, --deleters, --batch-size, --flush-seconds) as `python main.py` would use them."""
    try:
        from cli.parser import build_parser  # the CLI is what the benchmark runs

        parser = build_parser()
        return (
            parser.get_default("receivers"),
            parser.get_default("deleters"),
            parser.get_default("batch_size"),
            parser.get_default("flush_seconds"),
        )
    except (ImportError, AttributeError):
        from config import PipelineOptions

        options = PipelineOptions()
        return options.receivers, options.deleters, options.batch_size, options.flush_seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its report; return the exit code."""
    args = _parser().parse_args(argv)
    if args.rewrite_markdown:
        _rewrite_markdown(Path(args.rewrite_markdown))
        return EXIT_OK
    services = Services.for_emulator(args.endpoint_url, args.database_url)
    receivers, deleters, batch_size, flush_seconds = etl_defaults()
    limit_threads = receivers + deleters  # the SQS calls the ETL may have in flight
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    code_before = _code_fingerprint()
    header = _environment(services, receivers, deleters, batch_size, flush_seconds, args)
    for line in header:
        progress(line)
    bodies = list(generate(args.count, SEED))
    # The sink passes 20,000 messages in ~0.3 s, too short to time well: it gets more of them.
    sink_bodies = bodies if args.sink_count == args.count else list(generate(args.sink_count, SEED))
    naive_count = args.naive_latency_count or max(RECEIVE_BATCH, args.count // 10)
    results: dict[str, list[Measurement]] = {}

    def record(key: str, label: str, measure: Callable[[], Measurement]) -> None:
        result = measure()
        results.setdefault(key, []).append(result)
        progress(
            f"  {label}: {result.items:,} in {result.seconds:.2f} s = {result.rate:,.0f}/s"
            + (f", peak RSS {result.rss_kb / 1024:.0f} MB" if result.rss_kb else "")
            + (f"; {result.check}" if result.check else "")
        )

    with ExitStack() as stack:
        proxy = None if args.skip_latency else stack.enter_context(latency_proxy(args.endpoint_url, args.latency_ms))
        for run in range(1, args.runs + 1):
            progress(f"run {run}/{args.runs}")
            record("limit", "limit", lambda: _drain(services, bodies, limit_threads))
            record("ours", "ours", lambda: _ours(services, bodies))
            record("naive", "naive", lambda: _naive(services, bodies))
            sink_result, copy_result, copy_fmt_result = _sink(
                services, sink_bodies, receivers, batch_size, flush_seconds
            )
            record("sink", "sink", _measured(sink_result))
            record("copy", "bare COPY, pre-formatted", _measured(copy_result))
            record("copy_fmt", "bare COPY, formatting timed", _measured(copy_fmt_result))
            if proxy is not None:
                record("limit_lat", "limit +latency", lambda: _drain(services, bodies, limit_threads, proxy))
                record("ours_lat", "ours +latency", lambda: _ours(services, bodies, proxy))
                record(
                    "naive_lat",
                    f"naive +latency ({naive_count:,}-message subset)",
                    lambda: _naive(services, bodies[:naive_count], proxy),
                )
                record(
                    "naive_lat_full",
                    f"  extrapolated to {args.count:,}",
                    lambda: results["naive_lat"][-1].extrapolated(args.count),
                )
        if args.rss:
            progress(f"rss: ours draining {args.rss_count:,}")
            record("rss", "ours (rss)", lambda: _ours(services, list(generate(args.rss_count, SEED))))
    code_after = _code_fingerprint()
    footer = (
        []
        if code_after == code_before
        else [
            f"WARNING: the ETL's code changed during the run ({code_before} -> {code_after}); figures may mix versions"
        ]
    )
    footer += [
        f"finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC after "
        f"{(datetime.now(timezone.utc) - started).total_seconds() / 60:.1f} min; load average "
        f"before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 cores shared with other work)"
    ]
    report = [*header, "", *_report(results, args, limit_threads, naive_count), "", *footer]
    print("\n".join(report))
    cpu_report = []
    if args.cpu:
        progress("cpu: CPU per message (bench/cpu.py)")
        cpu_report = cpu.run(args, services)
        print("\n".join(["", *cpu_report]))
    if args.markdown:
        command = " ".join(
            ["PYTHONPATH=scripts .venv/bin/python -m bench.run", *(argv if argv is not None else sys.argv[1:])]
        )
        _write_markdown(Path(args.markdown), report, command)
        if cpu_report:
            cpu.write_section(Path(args.markdown), cpu_report, command)
    checks = [m.check for key in ("ours", "ours_lat", "rss", "sink") for m in results.get(key, [])]
    return EXIT_MISMATCH if any(c and not c.startswith("OK") for c in checks) else EXIT_OK


def _drain(services: Services, bodies: list[str], threads: int, proxy: str | None = None) -> Measurement:
    with filled_queue(services, bodies) as url:
        return bare_drain(services, via(url, proxy) if proxy else url, threads, endpoint_url=proxy)


def _ours(services: Services, bodies: list[str], proxy: str | None = None) -> Measurement:
    with filled_queue(services, bodies) as url, fresh_database(services) as dsn:
        return run_etl(services, url, dsn, sent=len(bodies), endpoint_url=proxy)


def _naive(services: Services, bodies: list[str], proxy: str | None = None) -> Measurement:
    with filled_queue(services, bodies) as url, fresh_database(services) as dsn:
        return naive_loop(services, via(url, proxy) if proxy else url, dsn, endpoint_url=proxy)


def _measured(result: Measurement) -> Callable[[], Measurement]:
    """A measurement already taken, in the shape `record` wants."""
    return lambda: result


def _sink(
    services: Services, bodies: list[str], receivers: int, batch_size: int, flush_seconds: float
) -> tuple[Measurement, Measurement, Measurement]:
    with fresh_database(services) as dsn:
        return sink(services, bodies, dsn, receivers, batch_size, flush_seconds)


# -- report ---------------------------------------------------------------------------------------


def _environment(
    services: Services, receivers: int, deleters: int, batch_size: int, flush_seconds: float, args: argparse.Namespace
) -> list[str]:
    cpu = _first_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    memory_kb = _first_value("/proc/meminfo", "MemTotal")
    memory = f", {int(memory_kb.split()[0]) / 1024 / 1024:.1f} GiB RAM" if memory_kb else ""
    psycopg2_version = psycopg2.__version__.split()[0]  # type: ignore[attr-defined]  # not in types-psycopg2
    return [
        f"login-etl benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine:    nproc {len(os.sched_getaffinity(0))} ({cpu}{memory}), "
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"emulator:   {_emulator(services.endpoint_url)} at {services.endpoint_url}",
        f"PostgreSQL: {_postgres_version(services.admin_dsn)}",
        f"Python {platform.python_version()}, boto3 {boto3.__version__}, botocore {botocore.__version__}, "
        f"psycopg2 {psycopg2_version}, cryptography {cryptography.__version__}",
        f"ETL code:   git {_git_head()}, fingerprint {_code_fingerprint()} (sha256 of the modules under test)",
        f"ETL defaults (main.py): --receivers {receivers} --deleters {deleters} --batch-size {batch_size} "
        f"--flush-seconds {flush_seconds}",
        f"messages per drain: {args.count:,}; through the sink: {args.sink_count:,}; runs: {args.runs} "
        "(figures are medians); "
        + ("no latency scenarios" if args.skip_latency else f"latency proxy: +{args.latency_ms:g} ms per request"),
    ]


def _code_fingerprint() -> str:
    """A short hash of the ETL's modules, to tell whether the code under test changed mid-run."""
    digest = hashlib.sha256()
    files = [ROOT / name for name in ("main.py", "config.py", "models.py")]
    for package in ("aws", "cli", "database", "etl", "pii"):
        files += sorted((ROOT / package).glob("*.py"))
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "--no-optional-locks", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return head or "unknown"


def _emulator(endpoint_url: str) -> str:
    try:
        with urllib.request.urlopen(f"{endpoint_url.rstrip('/')}/_localstack/health", timeout=5) as response:
            health = json.load(response)
        return f"LocalStack {health.get('version', '?')} (edition {health.get('edition', '?')})"
    except (OSError, ValueError):
        return "unknown emulator (no /_localstack/health)"


def _postgres_version(dsn: str) -> str:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            (version,) = _one(cur)
            return str(version).split(" on ")[0] + " (" + _setting(cur, "fsync") + ")"
    finally:
        conn.close()


def _setting(cur: psycopg2.extensions.cursor, name: str) -> str:
    cur.execute("SELECT current_setting(%s)", (name,))
    (value,) = _one(cur)
    return f"{name}={value}"


def _one(cur: psycopg2.extensions.cursor) -> tuple[object, ...]:
    row = cur.fetchone()
    assert row is not None, "the query returns one row"
    return row


def _first_value(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _report(
    results: dict[str, list[Measurement]], args: argparse.Namespace, limit_threads: int, naive_count: int
) -> list[str]:
    lat = f"+{args.latency_ms:g} ms"
    rows = [
        ("limit", f"1 limit: bare drain, {limit_threads} threads", "msgs/s"),
        ("ours", "2 ours: python main.py (wall)", "msgs/s"),
        ("naive", "3 naive: per-message loop", "msgs/s"),
        ("sink", "4 sink: pipeline, no SQS", "rows/s"),
        ("copy", "4 bare COPY, pre-formatted (DB limit)", "rows/s"),
        ("copy_fmt", "4 bare COPY incl. row formatting", "rows/s"),
        ("limit_lat", f"5 limit, {lat}", "msgs/s"),
        ("ours_lat", f"5 ours, {lat} (wall)", "msgs/s"),
        ("naive_lat", f"5 naive, {lat}, {naive_count:,} msgs", "msgs/s"),
        ("naive_lat_full", f"  naive extrapolated to {args.count:,}", "msgs/s"),
        ("rss", f"6 ours, {args.rss_count:,} msgs (wall)", "msgs/s"),
    ]
    lines = [f"{'scenario':<38} {'median':>9} {'unit':<7} {'each run':<26} {'wall s':>7} {'peak RSS':>9}"]
    for key, label, unit in rows:
        runs = results.get(key)
        if not runs:
            continue
        each = " ".join(f"{m.rate:,.0f}" for m in runs)
        rss = _median([m.rss_kb for m in runs if m.rss_kb])
        lines.append(
            f"{label:<38} {_median([m.rate for m in runs]):>9,.0f} {unit:<7} {each:<26} "
            f"{_median([m.seconds for m in runs]):>7.2f} {f'{rss / 1024:.0f} MB' if rss else '-':>9}"
        )
        inner = [m.inner_rate for m in runs if m.inner_rate]
        if inner:
            lines.append(
                f"{'  same, by its own timer':<38} {_median(inner):>9,.0f} {unit:<7} "
                + " ".join(f"{r:,.0f}" for r in inner)
            )
    if "naive_lat" in results:
        lines.append(
            f"  naive {lat} ran on a subset of {naive_count:,} of {args.count:,} messages; its time for all "
            f"{args.count:,} is extrapolated (busy time scaled, the final empty 1 s poll counted once)"
        )
    lines.append(
        f"  the bare COPYs load the sink's rows {COPY_REPEAT} times over (one {args.sink_count:,}-row COPY "
        "is too short to time well)"
    )
    lines.append(
        "  every drain ends with one empty 1 s long poll (as the ETL's drain mode does); wall time "
        "includes it, and for ours also the interpreter start"
    )
    checks = [
        f"  {key} run {i}: {m.check}"
        for key in ("ours", "ours_lat", "rss")
        for i, m in enumerate(results.get(key, []), start=1)
    ]
    lines += ["", "correctness (rows + rejected == sent, queue empty):", *checks]
    lines += ["", *_targets(results, lat, args)]
    return lines


def _targets(results: dict[str, list[Measurement]], lat: str, args: argparse.Namespace) -> list[str]:
    def rate(key: str, inner: bool = False) -> float | None:
        runs = results.get(key)
        if not runs:
            return None
        values = [m.inner_rate if inner else m.rate for m in runs]
        return _median([v for v in values if v]) if all(values) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def paired(a: str, b: str, inner: bool = False) -> str:
        """Ratios run by run (scenarios of one run ran minutes apart, under the same load)."""
        values = []
        for x, y in zip(results.get(a, []), results.get(b, []), strict=True):
            mine = x.inner_rate if inner else x.rate
            if mine and y.rate:
                values.append(mine / y.rate)
        return "  (per run: " + " ".join(f"{v:.2f}" for v in values) + ")" if len(values) > 1 else ""

    def row(
        label: str, value: float | None, target: float, fmt: str, lower_is_better: bool = False, note: str = ""
    ) -> str:
        sign = "<=" if lower_is_better else ">="
        if value is None:
            return f"{label:<44} {'n/a':>10}   target {sign} {target:{fmt}}   not run"
        ok = value <= target if lower_is_better else value >= target
        return f"{label:<44} {value:>10{fmt}}   target {sign} {target:{fmt}}   {'PASS' if ok else 'MISS'}{note}"

    rss_20k = _median([m.rss_kb / 1024 for m in results.get("ours", []) if m.rss_kb])
    rss_big = _median([m.rss_kb / 1024 for m in results.get("rss", []) if m.rss_kb])
    lines = [
        "targets (issue 7)                             measured",
        row(
            "ours / limit (wall time)",
            ratio(rate("ours"), rate("limit")),
            TARGET_OURS_VS_LIMIT,
            ".2f",
            note=paired("ours", "limit"),
        ),
        row(
            "ours / limit (ours by its own timer)",
            ratio(rate("ours", True), rate("limit")),
            TARGET_OURS_VS_LIMIT,
            ".2f",
            note=paired("ours", "limit", inner=True),
        ),
        row("sink rows/s", rate("sink"), TARGET_SINK_ROWS_PER_SECOND, ",.0f"),
        row("sink / bare COPY, pre-formatted", ratio(rate("sink"), rate("copy")), TARGET_SINK_VS_COPY, ".2f"),
        row(f"ours {lat} msgs/s (wall)", rate("ours_lat"), TARGET_LATENCY_OURS_MSGS_PER_SECOND, ",.0f"),
        row(
            f"ours {lat} / naive {lat} (extrapolated)",
            ratio(rate("ours_lat"), rate("naive_lat_full")),
            TARGET_LATENCY_OURS_VS_NAIVE,
            ".1f",
        ),
        row(
            f"peak RSS MB, ours draining {args.count:,}",
            rss_20k or None,
            TARGET_PEAK_RSS_MB,
            ".0f",
            lower_is_better=True,
        ),
        row(
            f"peak RSS MB, ours draining {args.rss_count:,} (--rss)",
            rss_big or None,
            TARGET_PEAK_RSS_MB,
            ".0f",
            lower_is_better=True,
        ),
        "",
        "other ratios",
        f"  ours / naive                            {_fmt(ratio(rate('ours'), rate('naive')))}",
        f"  sink / bare COPY incl. row formatting   {_fmt(ratio(rate('sink'), rate('copy_fmt')))}",
        f"  ours {lat} / limit {lat}             {_fmt(ratio(rate('ours_lat'), rate('limit_lat')))}",
        f"  limit {lat} / limit                    {_fmt(ratio(rate('limit_lat'), rate('limit')))}",
    ]
    if rss_20k and rss_big:
        lines.append(
            f"  peak RSS {rss_big:.0f} MB for the large drain vs {rss_20k:.0f} MB for --count: x{rss_big / rss_20k:.2f}"
        )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


# Benchmarks of other scripts, whose output lives beside the design it measures: linked, not copied.
OTHER_BENCHMARKS = [
    "## Other benchmarks",
    "",
    "- **`user_logins` at scale** (`bench/partitions.py`): the sink's COPY rate with the table preloaded",
    "  with millions of rows, today's single table against the daily partitions, the write cost of the",
    "  analysts' token indexes, the analysts' queries and the disk per million rows. Its output, the",
    "  command lines and what it did not measure: [partitions: benchmark](partitions.md#benchmark-benchpartitionspy)",
    "  and [partitions: analysts at scale](partitions.md#analysts-at-scale).",
]


def _write_markdown(path: Path, report: list[str], command: str) -> None:
    """The report as a Markdown page: generated, never edited by hand. Its "CPU per message" section
    (bench/cpu.py's, between its markers) is kept until a run with --cpu replaces it."""
    old = path.read_text() if path.exists() else ""
    kept = ""
    if cpu.SECTION_BEGIN in old and cpu.SECTION_END in old:
        kept = cpu.SECTION_BEGIN + old.split(cpu.SECTION_BEGIN, 1)[1].split(cpu.SECTION_END, 1)[0] + cpu.SECTION_END
    scenarios = __doc__.split("Scenarios", 1)[1].split("\n", 1)[1].rstrip()
    page = [
        "# Benchmarks",
        "",
        f"<!-- Generated by `{command}`; do not edit by hand: rerun it. -->",
        "",
        f"Generated by `{command}` on {report[0].split(', ', 1)[1]}. The figures are medians over the runs;",
        "no test asserts a time. The machine, the emulator and the code measured are named in the first",
        "lines, and the load average before and after in the last.",
        "",
        "```",
        *report,
        "```",
        "",
        "## Scenarios",
        "",
        "```",
        scenarios.strip("\n"),
        "```",
        "",
        *OTHER_BENCHMARKS,
        "",
    ]
    if kept:
        page += [kept, ""]
    # bench/large_bodies.py's section, written by its own run, is kept as it is.
    start, end = "<!-- bench.large_bodies", "<!-- /bench.large_bodies -->"
    if start in old and end in old:
        page += [start + old.split(start, 1)[1].split(end, 1)[0] + end, ""]
    path.write_text("\n".join(page))
    progress(f"wrote {path}")


def _rewrite_markdown(path: Path) -> None:
    """Rebuild a page this script wrote around the report and command it already holds (runs nothing)."""
    text = path.read_text()
    command = text.split("<!-- Generated by `", 1)[1].split("`;", 1)[0]
    report = text.split("\n```\n", 1)[1].split("\n```\n", 1)[0].splitlines()
    _write_markdown(path, report, command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000, help="messages per drain (20000)")
    parser.add_argument(
        "--sink-count", type=int, default=100_000, help="messages through the sink and its bare COPYs (100000)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of every scenario; medians are reported (3)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay added to every SQS request (20)")
    parser.add_argument("--skip-latency", action="store_true", help="leave out the latency scenarios")
    parser.add_argument(
        "--naive-latency-count",
        type=int,
        default=None,
        help="messages for the naive loop under latency (a tenth of --count)",
    )
    parser.add_argument("--rss", action="store_true", help="also drain --rss-count messages with ours once")
    parser.add_argument("--rss-count", type=int, default=100_000, help="messages for --rss (100000)")
    parser.add_argument(
        "--markdown",
        metavar="PATH",
        default=None,
        help="also write the report as a dated Markdown page (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--rewrite-markdown",
        metavar="PATH",
        default=None,
        help="rewrite PATH (a page --markdown wrote) around the report it holds, after a change to the page's "
        "text in this script; runs no benchmark",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="also measure CPU per message (bench/cpu.py's options below)"
    )
    cpu.add_arguments(parser)
    add_service_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
