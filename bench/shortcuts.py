"""What each speed shortcut of the loop still buys: the shortcut beside the plain code it shadows,
on the same inputs, in one process (CPU time, best of --repeat).

    PYTHONPATH=scripts .venv/bin/python -m bench.shortcuts [--repeat 5]

- LoginEvent.from_body, whose fast path (models._ordinary_fields) takes an ordinary body, against
  LoginEvent.validated, the field-by-field validation it must agree with (tests/unit/test_models.py,
  a property test), after the same JSON parse, over the valid bodies of the shared generator.
- etl.metrics.BatchHistogram.observe_many against prometheus_client's Histogram.observe, once per
  value, for the freshness values of one 1,000-message batch (tests/unit/test_metrics.py holds
  the two to the same exposition).

Nothing is asserted: a shortcut that no longer buys anything should be removed (issue 30).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

import orjson

from etl.metrics import FRESHNESS_BUCKETS, BatchHistogram
from models import InvalidMessage, LoginEvent
from sample_data import generate


def _best(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.process_time()
        work()
        times.append(time.process_time() - began)
    return min(times)


def _parsing(repeat: int) -> tuple[float, float, int]:
    bodies = []
    for body in generate(20_000, 7):
        try:
            LoginEvent.from_body(body)
        except InvalidMessage:
            continue
        bodies.append(body)

    def fast() -> None:
        for body in bodies:
            LoginEvent.from_body(body)

    def plain() -> None:
        for body in bodies:
            LoginEvent.validated(orjson.loads(body))

    return _best(fast, repeat) / len(bodies), _best(plain, repeat) / len(bodies), len(bodies)


def _histogram(repeat: int) -> tuple[float, float]:
    from prometheus_client import CollectorRegistry, Histogram

    rng = random.Random(7)
    values: Sequence[float] = [rng.expovariate(1 / 3) for _ in range(1000)]
    batched = BatchHistogram("a_seconds", "d", FRESHNESS_BUCKETS, CollectorRegistry())
    plain = Histogram("b_seconds", "d", registry=CollectorRegistry(), buckets=FRESHNESS_BUCKETS)

    def one_by_one() -> None:
        for value in values:
            plain.observe(value)

    return _best(lambda: batched.observe_many(values), repeat), _best(one_by_one, repeat)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best is reported (5)")
    args = parser.parse_args(argv)
    fast, plain, bodies = _parsing(args.repeat)
    print(f"parse and validate an ordinary body ({bodies:,} valid bodies of the generator):")
    print(f"  LoginEvent.from_body (shortcut)         {fast * 1e6:6.2f} µs")
    saved = (plain - fast) * 1e6
    print(f"  orjson + LoginEvent.validated (plain)   {plain * 1e6:6.2f} µs   shortcut saves {saved:.2f} µs/message")
    batched, one_by_one = _histogram(args.repeat)
    print("freshness of one 1,000-message batch into a histogram of 16 buckets:")
    print(f"  BatchHistogram.observe_many (shortcut)  {batched * 1e3:6.3f} ms")
    print(
        f"  Histogram.observe x 1,000 (plain)       {one_by_one * 1e3:6.3f} ms   shortcut saves "
        f"{(one_by_one - batched) / 1000 * 1e6:.2f} µs/message"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
