#!/usr/bin/env python3
"""Generate login messages shaped like the original exercise, and optionally send them to SQS.

    python scripts/sample_data.py --count 1000 --seed 7 --send          # send to SQS_QUEUE_URL
    python scripts/sample_data.py --count 5 --seed 7                     # print JSON lines
    python scripts/sample_data.py --count 25 --batches                   # SendMessageBatch entries

Shape: UUID user_id, app_version like "2.3.0" or "0.96", device_type android/ios, IPv4 ip,
SSN-shaped device_id ("593-47-5928"), ~30% locale null, ~1% malformed (each kind of defect the
ETL must quarantine), and a share of repeated devices and IPs so duplicates show up.
Deterministic for a given seed and count. `--send` sends to a queue that must already exist
(`scripts/init-queue.sh` creates login-queue and its DLQ); it does not create one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LOCALES = ["RU", "PH", "US", "DE", "IN", "BR", "FR", "ID", "NG", "MX", "GB", "JP"]
APP_VERSIONS = ["2.3.0", "0.96", "2.00", "3.7.1", "1.0", "0.2.6", "5.13.2", "4.1"]
REPEAT_SHARE = 0.25  # chance that a message reuses an earlier device / IP
MALFORMED_SHARE = 0.01


def _login(rng: random.Random, devices: list[str], ips: list[str]) -> dict[str, object]:
    if devices and rng.random() < REPEAT_SHARE:
        device_id = rng.choice(devices)
    else:
        device_id = f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
        devices.append(device_id)
    if ips and rng.random() < REPEAT_SHARE:
        ip = rng.choice(ips)
    else:
        ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        ips.append(ip)
    return {
        "user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "app_version": rng.choice(APP_VERSIONS),
        "device_type": rng.choice(["android", "ios"]),
        "ip": ip,
        "locale": None if rng.random() < 0.3 else rng.choice(LOCALES),
        "device_id": device_id,
    }


def _malform(rng: random.Random, login: dict[str, object]) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return json.dumps(login)[:-7]  # truncated JSON
    if kind == 1:
        login.pop("user_id")
        return json.dumps(login)
    if kind == 2:
        login["app_version"] = 230  # a number where a string is required
        return json.dumps(login)
    if kind == 3:
        login["device_type"] = "x" * 40  # longer than varchar(32)
        return json.dumps(login)
    if kind == 4:
        return json.dumps([login])  # not an object
    return "foo=bar"  # not JSON at all


def generate(count: int, seed: int) -> Iterator[str]:
    """Yield `count` message bodies; the same seed and count give the same bodies."""
    rng = random.Random(seed)
    devices: list[str] = []
    ips: list[str] = []
    for _ in range(count):
        login = _login(rng, devices, ips)
        yield _malform(rng, login) if rng.random() < MALFORMED_SHARE else json.dumps(login)


def batch_entries(bodies: list[str]) -> Iterator[str]:
    """Yield one JSON Entries list per SendMessageBatch call (10 bodies each), for the AWS CLI."""
    for start in range(0, len(bodies), 10):
        chunk = bodies[start : start + 10]
        yield json.dumps([{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)])


def send(bodies: list[str], queue_url: str, endpoint_url: str | None, threads: int = 4) -> list[str]:
    """Send bodies with SendMessageBatch (10 per call) from a few threads; return their MessageIds."""
    import boto3  # imported here so that printing samples needs no AWS SDK

    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    chunks = [bodies[i : i + 10] for i in range(0, len(bodies), 10)]

    def send_many(part: list[list[str]]) -> list[str]:
        # A Session per thread: boto3 Sessions are not thread-safe (the clients made from them are).
        client = boto3.session.Session(region_name=region).client("sqs", endpoint_url=endpoint_url)
        sent: list[str] = []
        for chunk in part:
            entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)]
            response = client.send_message_batch(QueueUrl=queue_url, Entries=entries)
            if response.get("Failed"):
                raise RuntimeError(f"SendMessageBatch refused {len(response['Failed'])} entries")
            sent += [entry["MessageId"] for entry in response["Successful"]]
        return sent

    parts = [chunks[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [message_id for ids in pool.map(send_many, parts) for message_id in ids]


def _load_env() -> None:
    """Read .env like main.py does (the real environment wins), where python-dotenv is installed."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # e.g. inside the LocalStack container: the hook exports what it needs
        return
    load_dotenv(Path.cwd() / ".env", override=False)


def main(argv: list[str] | None = None) -> int:
    _load_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="messages to generate (1000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (42)")
    parser.add_argument("--send", action="store_true", help="send to SQS_QUEUE_URL instead of printing")
    parser.add_argument(
        "--batches",
        action="store_true",
        help="print one SendMessageBatch Entries JSON list (10 messages) per line; needs no boto3",
    )
    parser.add_argument(
        "--queue-url",
        default=os.environ.get("SQS_QUEUE_URL", "http://localhost:4566/000000000000/login-queue"),
    )
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL", "http://localhost:4566"))
    parser.add_argument(
        "--ids-file", type=Path, default=None, metavar="FILE", help="with --send: write the MessageIds sent, one a line"
    )
    args = parser.parse_args(argv)
    bodies = list(generate(args.count, args.seed))
    if not args.send:
        for line in batch_entries(bodies) if args.batches else bodies:
            print(line)
        return 0
    sent = send(bodies, args.queue_url, args.endpoint_url)
    if args.ids_file is not None:
        args.ids_file.write_text("".join(f"{message_id}\n" for message_id in sent))
    print(f"sent {len(sent)} messages to {args.queue_url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
