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
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from bench import cpu, report
from bench.scenarios import (
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
        report.rewrite_markdown(Path(args.rewrite_markdown), __doc__ or "")
        return EXIT_OK
    services = Services.for_emulator(args.endpoint_url, args.database_url)
    receivers, deleters, batch_size, flush_seconds = etl_defaults()
    limit_threads = receivers + deleters  # the SQS calls the ETL may have in flight
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    code_before = report.code_fingerprint()
    header = report.environment(services, receivers, deleters, batch_size, flush_seconds, args)
    for line in header:
        progress(line)
    bodies = list(generate(args.count, SEED))
    # The sink passes 20,000 messages in ~0.3 s, too short to time well: it gets more of them.
    sink_bodies = bodies if args.sink_count == args.count else list(generate(args.sink_count, SEED))
    naive_count = args.naive_latency_count or max(RECEIVE_BATCH, args.count // 10)
    results = _measure(args, services, bodies, sink_bodies, naive_count)
    footer = report.footer(started, load_before[0], code_before)
    lines = [*header, "", *report.report_lines(results, args, limit_threads, naive_count), "", *footer]
    print("\n".join(lines))
    _cpu_and_markdown(args, argv, services, lines)
    checks = [m.check for key in ("ours", "ours_lat", "rss", "sink") for m in results.get(key, [])]
    return EXIT_MISMATCH if any(c and not c.startswith("OK") for c in checks) else EXIT_OK


def _measure(
    args: argparse.Namespace, services: Services, bodies: list[str], sink_bodies: list[str], naive_count: int
) -> dict[str, list[Measurement]]:
    """Every run's drains, by key (a list of measurements each)."""
    receivers, deleters, batch_size, flush_seconds = etl_defaults()
    limit_threads = receivers + deleters  # the SQS calls the ETL may have in flight
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
    return results


def _cpu_and_markdown(
    args: argparse.Namespace, argv: Sequence[str] | None, services: Services, lines: list[str]
) -> None:
    """The CPU section (--cpu), then the Markdown (--markdown)."""
    cpu_report = []
    if args.cpu:
        progress("cpu: CPU per message (bench/cpu.py)")
        cpu_report = cpu.run(args, services)
        print("\n".join(["", *cpu_report]))
    if args.markdown:
        command = " ".join(
            ["PYTHONPATH=scripts .venv/bin/python -m bench.run", *(argv if argv is not None else sys.argv[1:])]
        )
        report.write_markdown(Path(args.markdown), lines, command, __doc__ or "")
        if cpu_report:
            cpu.write_section(Path(args.markdown), cpu_report, command)


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
