"""CPU per SQS call of each way the ETL can talk to SQS, one thread, against the real emulator.

    PYTHONPATH=scripts .venv/bin/python -m bench.sqs_calls [--count 5000] [--rounds 3]

For each client variant, a queue of --count messages is drained by one thread: receive 10, then
DeleteMessageBatch of what came back, until empty. The process's CPU time (user + sys,
time.process_time) over the calls is divided by the number of calls; the final empty poll is
not counted. CPU time, not wall time: the machine is shared, and CPU time is what a deployment
pays for (it still rises somewhat under contention: caches, frequency).

Variants (cheapest cut first, as issue 29 asks):
  boto3            SqsReader's client as main has it (aws/sqs.py)
  boto3-novalid    the same with parameter_validation=False
  json             aws/sqs_json.py: botocore's credentials and SigV4Auth, JSON on a urllib3 pool
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from aws.sqs import SqsReader
from bench.scenarios import Services, add_service_arguments, filled_queue, progress
from sample_data import generate

VARIANTS = ("boto3", "boto3-novalid", "json")


def reader_for(variant: str, queue_url: str, endpoint_url: str, region: str) -> SqsReader:
    """An SqsReader configured as `variant`."""
    return SqsReader(
        queue_url,
        endpoint_url=endpoint_url,
        region=region,
        wait_time_seconds=1,
        transport="json" if variant == "json" else "boto3",
        parameter_validation=variant == "boto3",
    )


def drain(reader: SqsReader) -> tuple[int, int, float]:
    """Receive 10 + delete until an empty poll; return (messages, calls, CPU seconds of the calls)."""
    messages = calls = 0
    cpu = 0.0
    while True:
        began = time.process_time()
        batch = reader.receive()
        if not batch:
            return messages, calls, cpu  # the empty poll proves the end: not a steady-state call
        reader.delete(batch)
        cpu += time.process_time() - began
        calls += 2
        messages += len(batch)


def measure(services: Services, bodies: Sequence[str], variant: str) -> tuple[float, float]:
    """(CPU µs per call, CPU µs per message) for one drain with `variant`."""
    with filled_queue(services, bodies) as url:
        reader = reader_for(variant, url, services.endpoint_url, services.region)
        reader.check()  # the client, its endpoint and credentials made before the clock starts
        messages, calls, cpu = drain(reader)
    if messages != len(bodies):
        raise RuntimeError(f"{variant}: drained {messages} of {len(bodies)}")
    return cpu / calls * 1e6, cpu / messages * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    """Run every variant --rounds times (interleaved, so drift hits all alike); print medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5_000, help="messages per drain (5000)")
    parser.add_argument("--rounds", type=int, default=3, help="drains per variant; medians reported (3)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    add_service_arguments(parser, database=False)
    args = parser.parse_args(argv)
    services = Services.for_emulator(args.endpoint_url, "")
    bodies = list(generate(args.count, 42))
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for round_ in range(1, args.rounds + 1):
        for variant in variants:
            per_call, per_message = measure(services, bodies, variant)
            results[variant].append((per_call, per_message))
            progress(f"round {round_} {variant}: {per_call:,.0f} µs CPU per call, {per_message:,.1f} per message")
    print(f"CPU (user+sys) per SQS call, one thread, {args.count:,} messages per drain, medians of {args.rounds}")
    print(f"{'variant':<16} {'µs/call':>9} {'µs/message':>11}  each run (µs/call)")
    base = statistics.median(c for c, _ in results[variants[0]])
    for variant, runs in results.items():
        per_call = statistics.median(c for c, _ in runs)
        per_message = statistics.median(m for _, m in runs)
        each = " ".join(f"{c:,.0f}" for c, _ in runs)
        print(
            f"{variant:<16} {per_call:>9,.0f} {per_message:>11,.1f}  {each}  ({per_call / base:.2f} of {variants[0]})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
