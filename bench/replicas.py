"""Throughput of 1, 2 and 4 competing `python main.py` replicas on one queue (sizing KEDA's queueLength).

    PYTHONPATH=scripts .venv/bin/python -m bench.replicas [--count 20000] [--runs 2] [--replicas 1 2 4]

Needs the stack of scripts/stack.sh. Each run fills a new uuid-named queue with --count sample
messages (~1% malformed), creates a throw-away database, starts R drain-mode replicas at once (the
CLI defaults, as the Deployment runs them but without --follow, so that each exits when the queue is
empty) and times them from start until the last one exits. Beside the rate it reports what sizing
needs: CPU seconds per replica (over the wall time: cores per replica), the peak RSS of any
replica, and the peak of messages in flight (ApproximateNumberOfMessagesNotVisible, sampled every
0.25 s), which KEDA counts with scaleOnInFlight. Every run is verified: rows + rejected == sent,
queue empty. Prints a table; no target, no assertion. The emulator (one LocalStack process on a
2-core machine) is the ceiling here, not the ETL: read the figures as that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.scenarios import Services, fresh_database, stored_counts, via
from sample_data import generate, send

ROOT = Path(__file__).resolve().parent.parent

SEED = 13


def run(services: Services, bodies: list[str], replicas: int) -> dict[str, float | str]:
    """One measured run of `replicas` drain processes on a new queue and database."""
    sqs = services.client()
    url = sqs.create_queue(QueueName=f"bench-replicas-{os.urandom(8).hex()}")["QueueUrl"]
    try:
        send(bodies, url, services.endpoint_url)
        with fresh_database(services) as dsn:
            env = dict(
                os.environ,
                SQS_QUEUE_URL=via(url, services.endpoint_url),
                AWS_ENDPOINT_URL=services.endpoint_url,
                AWS_ENDPOINT_URL_SQS=services.endpoint_url,
                DATABASE_URL=dsn,
                MASKING_KEY=services.masking_key,
                AWS_DEFAULT_REGION=services.region,
            )
            peaks = {"in_flight": 0, "rss_kb": 0}
            seconds, cpu = _drain(env, replicas, lambda pids, done: _sample(sqs, url, pids, peaks, done))
            loaded, rejected = stored_counts(dsn)
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        left = sum(int(v) for v in sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"].values())
    finally:
        sqs.delete_queue(QueueUrl=url)
    verdict = "OK" if loaded + rejected == len(bodies) and left == 0 else "MISMATCH"
    return {
        "rate": len(bodies) / seconds,
        "seconds": seconds,
        "cpu_per_replica": cpu / replicas / seconds,
        "rss_mb": peaks["rss_kb"] / 1024,
        "in_flight": peaks["in_flight"],
        "check": f"{verdict}: {loaded} + {rejected} rejected of {len(bodies)}, {left} left",
    }


def _sample(sqs: Any, url: str, pids: list[int], peaks: dict[str, int], done: threading.Event) -> None:
    """Until `done`: the queue's peak in-flight count and the processes' peak RSS, into `peaks`."""
    while not done.wait(0.25):
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])[
            "Attributes"
        ]
        in_flight = int(attributes["ApproximateNumberOfMessagesNotVisible"])
        peaks["in_flight"] = max(peaks["in_flight"], in_flight)
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            peaks["rss_kb"] = max(peaks["rss_kb"], int(line.split()[1]))
            except OSError:
                pass


def _drain(
    env: dict[str, str], replicas: int, sample: Callable[[list[int], threading.Event], None]
) -> tuple[float, float]:
    """Run `replicas` drain processes to the end, `sample` watching them: wall seconds, CPU seconds."""
    done = threading.Event()
    cpu_before = os.times()
    began = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        procs = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "main.py")],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            for _ in range(replicas)
        ]
        sampler = threading.Thread(target=sample, args=([p.pid for p in procs], done), daemon=True)
        sampler.start()
        codes = [p.wait(timeout=900) for p in procs]
        seconds = time.perf_counter() - began
        done.set()
        sampler.join()
        if any(codes):
            err.seek(0)
            raise RuntimeError(f"exit codes {codes}: {err.read().decode()[-800:]}")
    cpu_after = os.times()
    cpu = (cpu_after.children_user - cpu_before.children_user) + (
        cpu_after.children_system - cpu_before.children_system
    )
    return seconds, cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    services = Services.for_emulator(
        os.environ.get("TEST_SQS_ENDPOINT", "http://localhost:4566"),
        os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    bodies = list(generate(args.count, seed=SEED))
    started = datetime.now(timezone.utc)
    print(
        f"login-etl replicas benchmark, {started:%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}; {args.count:,} messages per run, {args.runs} runs (medians)"
    )
    print(
        f"{'replicas':>8}  {'msgs/s':>7}  {'each run':<16} {'wall s':>6}  {'cores/replica':>13}  "
        f"{'peak RSS MB':>11}  {'peak in flight':>14}"
    )
    mismatch = False
    for replicas in args.replicas:
        results = [run(services, bodies, replicas) for _ in range(args.runs)]
        mismatch |= any(str(r["check"]).startswith("MISMATCH") for r in results)

        def med(key: str, results: list[dict[str, float | str]] = results) -> float:
            return statistics.median(float(r[key]) for r in results)

        each = " ".join(f"{float(r['rate']):,.0f}" for r in results)
        rss = max(float(r["rss_mb"]) for r in results)
        in_flight = max(int(r["in_flight"]) for r in results)
        print(
            f"{replicas:>8}  {med('rate'):>7,.0f}  {each:<16} {med('seconds'):>6.2f}  "
            f"{med('cpu_per_replica'):>13.2f}  {rss:>11.0f}  {in_flight:>14,}"
        )
        for r in results:
            print(f"          {r['check']}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
