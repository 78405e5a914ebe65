"""bench.run's report: the environment it ran in, the table of medians, the targets of issue 7 with
PASS/MISS, and the Markdown page (docs/benchmarks.md) written from them."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import boto3
import botocore
import cryptography
import psycopg2

from bench import cpu
from bench.scenarios import COPY_REPEAT, Measurement, Services, kept_sections, progress

ROOT = Path(__file__).resolve().parent.parent

# Targets of issue 7.
TARGET_OURS_VS_LIMIT = 0.9
TARGET_SINK_ROWS_PER_SECOND = 50_000
TARGET_SINK_VS_COPY = 0.4
TARGET_LATENCY_OURS_MSGS_PER_SECOND = 1_500
TARGET_LATENCY_OURS_VS_NAIVE = 20
TARGET_PEAK_RSS_MB = 150


def environment(
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
        f"ETL code:   git {_git_head()}, fingerprint {code_fingerprint()} (sha256 of the modules under test)",
        f"ETL defaults (main.py): --receivers {receivers} --deleters {deleters} --batch-size {batch_size} "
        f"--flush-seconds {flush_seconds}",
        f"messages per drain: {args.count:,}; through the sink: {args.sink_count:,}; runs: {args.runs} "
        "(figures are medians); "
        + ("no latency scenarios" if args.skip_latency else f"latency proxy: +{args.latency_ms:g} ms per request"),
    ]


def footer(started: datetime, load_before: float, code_before: str) -> list[str]:
    """The report's last lines: a warning if the code under test changed mid-run, the duration, the load."""
    code_after = code_fingerprint()
    lines = (
        []
        if code_after == code_before
        else [
            f"WARNING: the ETL's code changed during the run ({code_before} -> {code_after}); figures may mix versions"
        ]
    )
    lines.append(
        f"finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC after "
        f"{(datetime.now(timezone.utc) - started).total_seconds() / 60:.1f} min; load average "
        f"before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (2 cores shared with other work)"
    )
    return lines


def code_fingerprint() -> str:
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


def report_lines(
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


def write_markdown(path: Path, report: list[str], command: str, doc: str) -> None:
    """The report as a Markdown page: generated, never edited by hand. Its "CPU per message" section
    (bench/cpu.py's, between its markers) is kept until a run with --cpu replaces it. `doc`: bench.run's
    docstring, whose "Scenarios" part the page quotes."""
    old = path.read_text() if path.exists() else ""
    kept = ""
    if cpu.SECTION_BEGIN in old and cpu.SECTION_END in old:
        kept = cpu.SECTION_BEGIN + old.split(cpu.SECTION_BEGIN, 1)[1].split(cpu.SECTION_END, 1)[0] + cpu.SECTION_END
    scenarios = doc.split("Scenarios", 1)[1].split("\n", 1)[1].rstrip()
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
    # The sections other benchmarks wrote by their own runs (large_bodies, sink_versus, shortcuts) are kept.
    for section in kept_sections(old):
        page += [section, ""]
    path.write_text("\n".join(page))
    progress(f"wrote {path}")


def rewrite_markdown(path: Path, doc: str) -> None:
    """Rebuild a page this script wrote around the report and command it already holds (runs nothing)."""
    text = path.read_text()
    command = text.split("<!-- Generated by `", 1)[1].split("`;", 1)[0]
    report = text.split("\n```\n", 1)[1].split("\n```\n", 1)[0].splitlines()
    write_markdown(path, report, command, doc)
