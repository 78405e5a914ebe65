"""The Docker path, run for real: Compose as the README tells a user to run it, and our image, hardened.

Against the engine DOCKER_HOST names (tests/integration/docker_engine.py). On these machines that is
../shared/tools/docker-standin.sh's engine with STAND-IN images, not the official ones (docs/operations.md
"With Docker" says what differs). Locally a missing engine skips; under CI=true it fails.

Bounded in time: creating or removing a container is the slow part (on vfs storage it copies or
deletes a whole filesystem), so one Compose project runs the user's path as a single scenario (up, a
host drain, a LocalStack restart, three consumers, our image's checks inside one of them, a stop in
the middle of a drain, down -v), recording what it saw; the tests below each check part of it. The
image is built once per session, its tag kept as the build cache; its layers are read from `docker
save`, and one throwaway image built FROM it shows that the layer check catches planted files. The
figures the module measures (image size, start-to-ready, stop-to-exit, step times) are printed and
written to .stack/docker-runtime-figures.json, not asserted.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
import yaml

from docker_engine import ROOT, DockerError, Layer, compose_binary, docker, docker_env, image_layers, inspect, run
from helpers import TEST_KMS_ENDPOINT, emulator_client, pii_values, query, queue_counts, send, unavailable
from pii.keys import generate_wrapped_key
from pii.masking import generate_key
from pii.tink_keyset import keyset_json, new_key_id
from proxy import TcpProxy
from sample_data import generate

# One worker runs the whole module, in order: its Compose project and image are module/session
# fixtures, which a second xdist worker would set up again.
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("docker")]

COMPOSE_FILE = ROOT / "docker-compose.yml"
TEST_OVERRIDE = Path(__file__).with_name("docker-compose.test.yml")
ETL_UID = 10001
SAMPLES, SAMPLE_SEED = 1000, 42  # the compose file's SAMPLE_COUNT and SAMPLE_SEED defaults
SAMPLES_LOADED, SAMPLES_REJECTED = 995, 5  # sample_data.generate(1000, 42) holds five malformed bodies
EXTRA, EXTRA_SEED = 3000, 17  # sent steadily (~7 s) while three consumers compete
STOP_AFTER = 600  # `docker compose stop etl` once this many of those are stored; the host drains the rest
TOTAL = 2 * SAMPLES + EXTRA
SUMMARY = re.compile(r"loaded (\d+), rejected (\d+), duplicates skipped (\d+)")
# Key files as each kind of mount shows them to uid 10001 (the Compose secret itself is the real
# /run/secrets/masking_key, prepared as docs/keys-and-privacy.md says: 10001:10001, 0400).
KEY_FILES = {
    "kubernetes": (0, ETL_UID, 0o440),  # a Secret with fsGroup 10001: root-owned, group-readable
    "left_as_is": (1000, 1000, 0o644),  # the host user's file, not prepared
    "root_only": (0, 0, 0o400),
}  # a Secret without fsGroup
TEST_KEYS_DIR = "/run/test-keys"  # where the override mounts them (docker-compose.test.yml)
METRICS_PORT = 9108  # the etl service's --metrics-port (docker-compose.yml)
# Figures the module measures and prints (not asserted: bench/ measures speed); also written here.
FIGURES_FILE = ROOT / ".stack" / "docker-runtime-figures.json"
# What no layer of our image may hold, anywhere in any layer (a file a later step deletes still ships
# in the layer that added it). Python's own bytecode in the base and site-packages is kept: Python needs it.
FORBIDDEN_IN_LAYERS = {
    "our tests or dev tree": re.compile(r"^app/(tests|bench|scripts|deploy|docs|monitoring|\.ci|\.venv)(/|$)"),
    ".env file": re.compile(r"(^|/)\.env(\.[^/]*)?$"),
    ".git": re.compile(r"(^|/)\.git(/|$)"),
    "bytecode of our code": re.compile(r"^app/(.*/)?(__pycache__(/|$)|[^/]*\.py[co]$)"),
    "pip or uv cache": re.compile(r"(^|/)\.cache/(pip|uv)(/|$)|^root/\.cache(/|$)|^tmp/(pip|uv)-"),
    "leftovers in /tmp": re.compile(r"^tmp/.+"),
}


class Stopwatch:
    """`with clock("step"):` records how long each step took, into `timings`."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = round(time.monotonic() - started, 1)


def wait_for(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def counts(dsn: str) -> tuple[int, int, int]:
    """(rows, distinct message ids, quarantined) in the ETL's tables; zeros before they exist."""
    try:
        [(rows, ids)] = query(dsn, "SELECT count(*), count(DISTINCT message_id) FROM user_logins")
        [(rejected,)] = query(dsn, "SELECT count(*) FROM user_logins_rejected")
    except psycopg2.errors.UndefinedTable:
        return 0, 0, 0
    return rows, ids, rejected


def sqs_at(port: int) -> Any:
    return emulator_client("sqs", f"http://localhost:{port}", attempts=2, connect_timeout=60)


def docker_time(text: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 timestamps (nanoseconds cut to microseconds)."""
    text = re.sub(r"(\.\d{6})\d*", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def compose_duration(text: str) -> float:
    """Seconds of a Compose duration such as `30s`, `1m30s` or `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def stop_grace_period() -> float:
    """The etl service's stop_grace_period, read from the user's compose file."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return compose_duration(str(services["etl"]["stop_grace_period"]))


def forbidden_in(layers: list[Layer]) -> dict[str, list[str]]:
    """{what: ["<layer step>: path", ...]} for every FORBIDDEN_IN_LAYERS match in any layer."""
    found: dict[str, list[str]] = {}
    for layer in layers:
        for path in layer.paths:
            for what, pattern in FORBIDDEN_IN_LAYERS.items():
                if pattern.search(path):
                    found.setdefault(what, []).append(f"{layer.created_by[-60:]}: {path}")
    return found


def record_figures(figures: dict[str, Any]) -> None:
    """Print the measured figures (pytest -s or -rA shows them) and merge them into FIGURES_FILE."""
    print(f"docker figures: {json.dumps(figures)}")
    FIGURES_FILE.parent.mkdir(exist_ok=True)
    known = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
    FIGURES_FILE.write_text(json.dumps({**known, **figures}, indent=1) + "\n")


# --- the scenario -----------------------------------------------------------------------------


class Compose:
    """`docker compose -p PROJECT -f docker-compose.yml -f the test override`, a timeout on every call."""

    def __init__(self, project: str, env_file: Path, **variables: str) -> None:
        self.project = project
        self.base = [
            str(compose_binary()),
            "-p",
            project,
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(TEST_OVERRIDE),
            "--env-file",
            str(env_file),
        ]
        self.env = docker_env(**variables)

    def __call__(self, *args: str, timeout: float = 120) -> str:
        return run([*self.base, *args], timeout=timeout, env=self.env).stdout

    def port(self, service: str, port: int) -> int:
        return int(self("port", service, str(port), timeout=30).strip().rsplit(":", 1)[1])

    def containers(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(docker("ps", "-aq", *filters, timeout=30).stdout.split())

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": self.containers(),
            "volumes": docker("volume", "ls", "-q", "--filter", label, timeout=30).stdout.split(),
            "networks": docker("network", "ls", "-q", "--filter", label, timeout=30).stdout.split(),
        }


@dataclass
class Consumer:
    """One `etl` replica as the scenario saw it."""

    name: str
    state: dict[str, Any]
    host_config: dict[str, Any]
    exit_code: int | None = None
    logs: str = field(default="", repr=False)
    ready_at: float | None = None  # when the host first got 200 from its /readyz (seconds since the epoch)
    stop_to_exit: float | None = None  # from `docker compose stop etl` to the container's FinishedAt

    def summary(self) -> tuple[int, int, int]:
        match = SUMMARY.search(self.logs)
        assert match, f"{self.name} printed no summary:\n{self.logs[-2000:]}"
        return int(match[1]), int(match[2]), int(match[3])

    def start_to_healthy(self) -> float:
        passed = [check for check in self.state["Health"]["Log"] if check["ExitCode"] == 0]
        return docker_time(passed[0]["End"]) - docker_time(self.state["StartedAt"])

    def start_to_ready(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - docker_time(self.state["StartedAt"])


@dataclass
class UserPath:
    """What the scenario saw, step by step; each test checks some of it."""

    project: str
    key: str = field(repr=False)  # a failing assertion prints the dataclass: never the key
    timings: dict[str, float] = field(default_factory=dict)
    queue: dict[str, str] = field(default_factory=dict)
    dlq: dict[str, str] = field(default_factory=dict)
    first_drain: int | None = None
    after_first_drain: tuple[int, int, int] = (0, 0, 0)
    queue_after_first_drain: tuple[int, int] = (-1, -1)
    queue_after_restart: tuple[int, int] = (-1, -1)
    consumers: list[Consumer] = field(default_factory=list)
    inside: dict[str, Any] = field(default_factory=dict)  # what one consumer's container showed
    key_checks: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)
    kms_missing: str = ""
    sending_at_stop: bool = False
    after_stop: tuple[int, int, int] = (0, 0, 0)
    queue_after_stop: tuple[int, int] = (-1, -1)
    grace_seconds: float = 0.0  # the consumers' StopTimeout, as Compose set it
    last_drain: int | None = None
    final: tuple[int, int, int] = (0, 0, 0)
    queue_final: tuple[int, int] = (-1, -1)
    dlq_final: tuple[int, int] = (-1, -1)
    bodies: list[str] = field(default_factory=list, repr=False)  # nor raw ip / device_id values
    leftovers: dict[str, list[str]] = field(default_factory=dict)


def send_steadily(sqs: Any, queue_url: str, bodies: list[str], per_second: float = 400) -> None:
    """Send in batches of 10 at about `per_second` messages a second."""
    started = time.monotonic()
    for sent in range(0, len(bodies), 100):
        send(sqs, queue_url, bodies[sent : sent + 100])
        time.sleep(max(0.0, started + (sent + 100) / per_second - time.monotonic()))


def watch_readiness(compose: Compose, ready_at: dict[str, float], stop: threading.Event) -> None:
    """Poll each etl container's /readyz from the host, at its address on the Compose network, and
    note when each first answers 200 (for start-to-ready; not asserted)."""
    addresses: dict[str, str] = {}
    while not stop.is_set():
        try:
            for name in compose.containers("etl"):
                if name not in addresses:
                    networks = inspect("container", name)["NetworkSettings"]["Networks"]
                    address = next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), None)
                    if address:
                        addresses[name] = address
        except DockerError:
            pass  # a container between create and start
        for name, address in addresses.items():
            if name not in ready_at:
                try:
                    with urllib.request.urlopen(f"http://{address}:{METRICS_PORT}/readyz", timeout=0.5) as answer:
                        if answer.status == 200:
                            ready_at[name] = time.time()
                except OSError:
                    pass
        time.sleep(0.05)


def drain_on_the_host(sqs_port: int, pg_port: int, key: str, workdir: Path) -> int:
    """`python main.py` on the host, the README's first workflow: in-process, through the published ports."""
    import main

    env = {
        "AWS_ENDPOINT_URL": f"http://localhost:{sqs_port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "SQS_QUEUE_URL": f"http://localhost:{sqs_port}/000000000000/login-queue",
        "DATABASE_URL": f"postgresql://postgres:postgres@127.0.0.1:{pg_port}/postgres",
        "MASKING_KEY": key,
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # no .env
        for name in list(os.environ):
            if name.startswith(("AWS_", "SQS_", "DATABASE_URL", "MASKING_KEY")):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return main.main(["--quiet"])


def prepare_keys(tmp: Path, key: str) -> tuple[Path, Path]:
    """The Compose secret's host file, as documented (10001:10001, 0400), and a directory of key
    files with the owners and modes other mounts give them."""
    secret = tmp / "masking_key"
    secret.write_text(key + "\n")
    try:
        os.chown(secret, ETL_UID, ETL_UID)
    except PermissionError:
        unavailable("root, to chown the key files as a Compose or Kubernetes secret has them")
    secret.chmod(0o400)
    keys = tmp / "keys"
    keys.mkdir()
    keys.chmod(0o755)
    for name, (uid, gid, mode) in KEY_FILES.items():
        (keys / name).write_text(key + "\n")
        os.chown(keys / name, uid, gid)
        (keys / name).chmod(mode)
    return secret, keys


# Run inside a consumer's container with `docker exec -i`: `main.main(["check"])` once per key
# source, each alone (the others set empty, i.e. unset); one interpreter for all of them.
CHECK_EACH_SOURCE = """
import contextlib, io, json, os, sys
import main
results = {}
for name, env in json.load(sys.stdin).items():
    for var in [v for v in os.environ if v.startswith("MASKING_KEY")]:
        del os.environ[var]
    os.environ.update(env)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main.main(["check"])
    results[name] = [code, out.getvalue()]
print(json.dumps(results))
"""


def key_sources(key: str, kms_endpoint: str | None) -> dict[str, dict[str, str]]:
    key_id = new_key_id()
    sources = {
        "MASKING_KEY": {"MASKING_KEY": key},
        # version 1 is the key the consumers wrote with (the database records it: one version, one key)
        "MASKING_KEYS": {"MASKING_KEYS": f"1:{key},2:{generate_key()}", "MASKING_KEY_VERSION": "2"},
        "MASKING_KEYSET": {"MASKING_KEYSET": keyset_json({key_id: base64.b64decode(key)}, key_id)},
        "MASKING_KEY_FILE as a Compose secret (10001:10001 0400)": {"MASKING_KEY_FILE": "/run/secrets/masking_key"},
    }
    for name in KEY_FILES:
        sources[f"MASKING_KEY_FILE {name}"] = {"MASKING_KEY_FILE": f"{TEST_KEYS_DIR}/{name}"}
    if kms_endpoint:
        kms = emulator_client("kms", TEST_KMS_ENDPOINT)
        blob = generate_wrapped_key(
            kms.create_key()["KeyMetadata"]["KeyId"], region="us-east-1", endpoint_url=TEST_KMS_ENDPOINT
        )
        # a new data key: under a version the database has not recorded (one version, one key)
        sources["MASKING_KEY_KMS_CIPHERTEXT"] = {
            "MASKING_KEY_KMS_CIPHERTEXT": f"3:{blob}",
            "MASKING_KEY_VERSION": "3",
            "AWS_ENDPOINT_URL_KMS": kms_endpoint,
        }
    return sources


def look_inside(consumer: str, seen: UserPath, network: str) -> None:
    """Our image's facts, from inside a running consumer: the process, the filesystem, the keys."""

    def sh(*args: str, stdin: str | None = None) -> Any:
        return run(
            ["docker", "exec", *(["-i"] if stdin else []), consumer, *args], timeout=120, check=False, input=stdin
        )

    seen.inside["status"] = dict(
        line.split(":\t", 1) for line in sh("cat", "/proc/1/status").stdout.splitlines() if ":\t" in line
    )
    seen.inside["cmdline"] = sh("cat", "/proc/1/cmdline").stdout.split("\0")
    seen.inside["writes"] = {
        path: sh("python", "-c", f"open({path!r}, 'a')").stderr.strip().splitlines()[-1:]
        for path in ("/app/main.py", "/app/new.py", "/tmp/x")
    }
    seen.inside["app"] = sh("find", "/app", "-mindepth", "1", "-printf", "%P %u %m\n").stdout.splitlines()
    # The KMS emulator listens on the host's 127.0.0.1 only: relay it to the Compose network's gateway.
    gateway = inspect("network", network)["IPAM"]["Config"][0]["Gateway"]
    relay = None
    try:
        target = urlsplit(TEST_KMS_ENDPOINT)
        relay = TcpProxy(target.hostname or "localhost", target.port or 80, listen_host=gateway)
        sources = key_sources(seen.key, f"http://{gateway}:{relay.port}")
    except Exception as exc:  # noqa: BLE001 - any failure means: no KMS emulator to wrap a key with
        seen.kms_missing = f"KMS at {TEST_KMS_ENDPOINT} ({type(exc).__name__})"
        sources = key_sources(seen.key, None)
    try:
        result = sh("python", "-c", CHECK_EACH_SOURCE, stdin=json.dumps(sources))
        assert result.returncode == 0, result.stdout + result.stderr
        seen.key_checks = {name: (code, text) for name, (code, text) in json.loads(result.stdout).items()}
    finally:
        if relay is not None:
            relay.close()


@pytest.fixture(scope="module")
def user_path(etl_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserPath]:
    """The README's Compose path, once. Every step has a timeout; `down -v` runs even on failure."""
    tmp = tmp_path_factory.mktemp("compose")
    seen = UserPath(project=f"login-etl-test-{os.urandom(4).hex()}", key=generate_key())
    secret, keys = prepare_keys(tmp, seen.key)
    env_file = tmp / "compose.env"  # as the user's .env would hold it; not the checkout's .env
    env_file.write_text(f"MASKING_KEY_FILE={secret}\n")
    compose = Compose(seen.project, env_file, LOGIN_ETL_TEST_IMAGE=etl_image, LOGIN_ETL_TEST_KEYS=str(keys))
    clock = Stopwatch(seen.timings)
    try:
        with clock("up --wait"):
            compose("up", "-d", "--wait", "--wait-timeout", "200", timeout=240)
        sqs_port, pg_port = compose.port("localstack", 4566), compose.port("postgres", 5432)
        dsn = f"postgresql://postgres:postgres@127.0.0.1:{pg_port}/postgres"
        sqs = sqs_at(sqs_port)
        queue_url = f"http://localhost:{sqs_port}/000000000000/login-queue"
        dlq_url = f"http://localhost:{sqs_port}/000000000000/login-queue-dlq"
        seen.queue = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        seen.dlq = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"]

        with clock("host drain"):
            seen.first_drain = drain_on_the_host(sqs_port, pg_port, seen.key, tmp)
        seen.after_first_drain = counts(dsn)
        seen.queue_after_first_drain = queue_counts(sqs, queue_url)

        # docker-compose.yml: "LocalStack community keeps queues in memory: after a container
        # restart the queue is new again and gets the samples again". A second `up` after a stop:
        with clock("localstack stop, up --wait"):
            compose("stop", "localstack", timeout=60)
            compose("up", "-d", "--wait", "--wait-timeout", "200", timeout=240)
        sqs_port = compose.port("localstack", 4566)  # ephemeral: a new one after the restart
        sqs = sqs_at(sqs_port)
        seen.queue_after_restart = queue_counts(sqs, queue_url)

        ready_at: dict[str, float] = {}
        watching = threading.Event()
        watcher = threading.Thread(target=watch_readiness, args=(compose, ready_at, watching), daemon=True)
        with clock("--profile etl up --scale etl=3 --wait"):
            watcher.start()
            try:
                compose(
                    "--profile", "etl", "up", "-d", "--scale", "etl=3", "--wait", "--wait-timeout", "150", timeout=200
                )
            finally:
                watching.set()
                watcher.join(timeout=10)
        seen.consumers = [
            Consumer(name, state["State"], state["HostConfig"], ready_at=ready_at.get(name))
            for name in compose.containers("etl")
            for state in [inspect("container", name)]
        ]
        with clock("checks inside a consumer"):
            look_inside(seen.consumers[0].name, seen, f"{seen.project}_default")

        extra = list(generate(EXTRA, EXTRA_SEED))
        seen.bodies = list(generate(SAMPLES, SAMPLE_SEED)) + extra
        before = sum(counts(dsn)[::2])
        seen.grace_seconds = inspect("container", seen.consumers[0].name)["Config"].get("StopTimeout") or 10
        stopped_at = 0.0
        # A steady stream the three consumers compete for, still flowing when they are stopped, so
        # that each has batches in hand when its SIGTERM arrives (a consumer receives ahead of its
        # commits: a burst could sit in its hands whole and make "in the middle" meaningless).
        sender = threading.Thread(target=send_steadily, args=(sqs, queue_url, extra), daemon=True)
        with clock("send, stop in the middle"):
            sender.start()
            wait_for(lambda: sum(counts(dsn)[::2]) >= before + STOP_AFTER, timeout=120, interval=0.1)
            seen.sending_at_stop = sender.is_alive()
            stopped_at = time.time()
            compose("--profile", "etl", "stop", "etl", timeout=90)
            sender.join(timeout=120)
        seen.after_stop = counts(dsn)
        seen.queue_after_stop = queue_counts(sqs, queue_url)
        for consumer in seen.consumers:
            state = inspect("container", consumer.name)["State"]
            consumer.exit_code = state["ExitCode"]
            consumer.stop_to_exit = docker_time(state["FinishedAt"]) - stopped_at
            logs = docker("logs", consumer.name, timeout=30)
            consumer.logs = logs.stdout + logs.stderr

        with clock("host drain of the rest"):
            seen.last_drain = drain_on_the_host(sqs_port, pg_port, seen.key, tmp)
        seen.final = counts(dsn)
        seen.queue_final = queue_counts(sqs, queue_url)
        seen.dlq_final = queue_counts(sqs, dlq_url)
    finally:
        with clock("down -v"):
            try:
                compose("--profile", "etl", "down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)
            finally:
                seen.leftovers = compose.leftovers()
        print(f"compose steps (s): {seen.timings}")  # shown with -rA, and on failure
    yield seen


# --- Compose: the user's path ------------------------------------------------------------------


def test_compose_up_wait_makes_localstack_and_postgres_healthy_with_the_queue_its_dlq_and_the_samples(
    user_path: UserPath,
) -> None:
    assert user_path.queue["ApproximateNumberOfMessages"] == str(SAMPLES)
    redrive = json.loads(user_path.queue["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == user_path.dlq["QueueArn"]
    assert user_path.dlq["ApproximateNumberOfMessages"] == "0"


def test_python_main_py_on_the_host_drains_the_samples_through_the_published_ports(user_path: UserPath) -> None:
    assert user_path.first_drain == 0
    assert user_path.after_first_drain == (SAMPLES_LOADED, SAMPLES_LOADED, SAMPLES_REJECTED)
    assert user_path.queue_after_first_drain == (0, 0)


def test_a_second_up_after_a_localstack_restart_creates_the_queue_again_with_new_samples(user_path: UserPath) -> None:
    # LocalStack community keeps queues in memory, so the hook sees a new queue and loads the
    # samples again, as new messages (new MessageIds: stored again, see the totals below).
    assert user_path.queue_after_first_drain == (0, 0)
    assert user_path.queue_after_restart[0] == SAMPLES


def test_three_scaled_consumers_become_healthy_locked_down_as_the_compose_file_says(user_path: UserPath) -> None:
    assert len(user_path.consumers) == 3
    for consumer in user_path.consumers:
        assert consumer.state["Health"]["Status"] == "healthy"
        assert consumer.host_config["ReadonlyRootfs"] is True
        assert consumer.host_config["CapDrop"] == ["ALL"]
        assert any(opt.startswith("no-new-privileges") for opt in consumer.host_config["SecurityOpt"])
        assert consumer.start_to_healthy() < 60


def test_stop_in_the_middle_of_a_drain_commits_each_batch_in_hand_and_every_consumer_exits_0(
    user_path: UserPath,
) -> None:
    # Stopped in the middle of a steady stream: messages were still arriving (and being received).
    assert user_path.sending_at_stop, "the stream had ended before the stop"
    assert user_path.queue_after_stop[0] > 0
    assert [c.exit_code for c in user_path.consumers] == [0, 0, 0]
    assert user_path.timings["send, stop in the middle"] < 120
    for consumer in user_path.consumers:
        assert "SIGTERM received: finishing the batch in hand" in consumer.logs
    # Nothing received was left uncommitted in flight: each message is stored or still queued.
    rows, ids, rejected = user_path.after_stop
    visible, in_flight = user_path.queue_after_stop
    assert in_flight == 0 and ids == rows
    assert rows + rejected + visible == TOTAL


def test_each_consumer_exits_inside_the_compose_files_stop_grace_period_after_the_stop(user_path: UserPath) -> None:
    grace = stop_grace_period()
    # Compose gave the containers that grace (Docker's StopTimeout: SIGKILL after it)...
    assert user_path.grace_seconds == grace, (user_path.grace_seconds, grace)
    # ...and each consumer exited on its own well inside it, counted from the moment `stop` was run.
    times = {c.name: c.stop_to_exit for c in user_path.consumers}
    assert all(t is not None and 0 <= t < grace for t in times.values()), (times, grace)


def test_three_competing_consumers_and_the_host_store_every_message_exactly_once(user_path: UserPath) -> None:
    rows, ids, rejected = user_path.final
    assert user_path.last_drain == 0 and rows + rejected > sum(user_path.after_stop[::2])  # it found the rest
    assert rows + rejected == TOTAL and ids == rows, user_path.final
    assert user_path.queue_final == (0, 0) and user_path.dlq_final == (0, 0)
    # What the consumers say they stored adds up to what the database holds from them: each once.
    summaries = [c.summary() for c in user_path.consumers]
    assert sum(s[0] for s in summaries) == user_path.after_stop[0] - SAMPLES_LOADED
    assert sum(s[1] for s in summaries) == user_path.after_stop[2] - SAMPLES_REJECTED
    assert all(loaded > 0 for loaded, _, _ in summaries), summaries  # all three competed


def test_the_consumers_logs_hold_no_raw_ip_or_device_id_nor_the_key(user_path: UserPath) -> None:
    values = pii_values(user_path.bodies) | {user_path.key}
    assert len(values) > 1000
    logs = "\n".join(c.logs for c in user_path.consumers)
    leaked = [value for value in values if value and value in logs]
    assert not leaked, f"{len(leaked)} raw values in the logs"  # not the values themselves


def test_compose_down_v_leaves_no_container_volume_or_network_behind(user_path: UserPath) -> None:
    assert user_path.leftovers == {"containers": [], "volumes": [], "networks": []}


# --- our image, hardened (inside a running consumer) -----------------------------------------------


def test_the_image_runs_python_as_pid_1_as_uid_10001_without_capabilities_or_new_privileges(
    user_path: UserPath,
    etl_image: str,
) -> None:
    assert inspect("image", etl_image)["Config"]["User"] == f"{ETL_UID}:{ETL_UID}"
    assert user_path.inside["cmdline"][:3] == ["python", "main.py", "--follow"]
    status = user_path.inside["status"]
    assert status["Uid"].split() == [str(ETL_UID)] * 4 and status["Gid"].split() == [str(ETL_UID)] * 4
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_the_root_filesystem_is_read_only_and_the_etl_runs_on_it(user_path: UserPath) -> None:
    writes = user_path.inside["writes"]
    # /tmp is world-writable in the image: only the read-only root stops the write there.
    assert writes["/tmp/x"] and "Read-only file system" in writes["/tmp/x"][0], writes
    for path in ("/app/main.py", "/app/new.py"):  # root's, and read-only besides
        assert writes[path] and ("Read-only file system" in writes[path][0] or "Permission denied" in writes[path][0])
    assert user_path.consumers[0].state["Health"]["Status"] == "healthy"


def test_the_app_in_the_image_is_the_code_and_its_lock_owned_by_root(user_path: UserPath) -> None:
    listing = [line.split() for line in user_path.inside["app"]]
    files = {path for path, _owner, _mode in listing}
    assert {"main.py", "pii/keys.py", "database/sqs_postgres.py", "requirements.lock"} <= files
    assert {owner for _path, owner, _mode in listing} == {"root"}  # uid 10001 reads the code, changes nothing


@pytest.fixture(scope="module")
def layers(etl_image: str, tmp_path_factory: pytest.TempPathFactory) -> list[Layer]:
    return image_layers(etl_image, tmp_path_factory.mktemp("layers"))


def test_no_layer_of_the_image_holds_tests_env_files_git_our_bytecode_or_package_caches(layers: list[Layer]) -> None:
    assert forbidden_in(layers) == {}
    # What Python needs is there: the interpreter, the locked dependencies, the app.
    paths = {path for layer in layers for path in layer.paths}
    assert "app/main.py" in paths and "usr/local/bin/python" in paths
    assert any(path.endswith("/boto3/__init__.py") for path in paths)
    assert any(path.endswith("/psycopg2/__init__.py") for path in paths)


def test_the_layer_check_finds_what_a_layer_holds_even_when_a_later_step_deletes_it(
    etl_image: str, tmp_path: Path
) -> None:
    """The check above can fail: files planted in a throwaway image built FROM ours, in a layer whose
    files the next step deletes (so a look at the container's filesystem would not see them)."""
    context = tmp_path / "context"
    planted = {
        "our tests or dev tree": "app/tests/test_planted.py",
        ".env file": "app/.env",
        ".git": "app/.git/HEAD",
        "bytecode of our code": "app/__pycache__/main.cpython-311.pyc",
        "pip or uv cache": "root/.cache/pip/http/planted",
        "leftovers in /tmp": "tmp/planted",
    }
    for path in planted.values():
        (context / "planted" / path).parent.mkdir(parents=True, exist_ok=True)
        (context / "planted" / path).write_text("planted\n")
    (context / "Dockerfile").write_text(
        f"FROM {etl_image}\nCOPY planted/ /\nUSER root\n"
        "RUN rm -rf /app/tests /app/.env /app/.git /app/__pycache__ /root/.cache /tmp/planted\n"
        "USER 10001:10001\n"
    )
    tag = f"login-etl-planted:{os.urandom(4).hex()}"
    run(
        ["docker", "build", "--force-rm", "-q", "-t", tag, str(context)],
        timeout=300,
        env=docker_env(DOCKER_BUILDKIT="0"),
    )
    try:
        found = forbidden_in(image_layers(tag, tmp_path))
        listing = run(
            ["docker", "run", "--rm", "--user", "0", tag, "find", "/app", "/root", "/tmp"], timeout=120
        ).stdout
    finally:
        docker("image", "rm", "-f", tag, timeout=120, check=False)
    assert set(found) == set(planted), found
    for what, path in planted.items():
        assert any(hit.endswith(f": {path}") for hit in found[what]), (what, found[what])
        assert f"/{path}" not in listing  # gone from the filesystem, still in the image


def test_image_size_and_start_to_ready_are_measured_and_printed(
    user_path: UserPath, layers: list[Layer], etl_image: str
) -> None:
    """Figures for the docs, printed and written to .stack/ (not asserted: bench/ measures speed)."""
    megabytes = 1000 * 1000
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base is not None
    ours = layers[len(inspect("image", base[1])["RootFS"]["Layers"]) :]  # the Dockerfile's steps
    figures = {
        "image": etl_image,
        "image_size_mb": round(inspect("image", etl_image)["Size"] / megabytes, 1),
        "base_size_mb": round(inspect("image", base[1])["Size"] / megabytes, 1),
        "layer_sizes_mb": {layer.created_by[-70:]: round(layer.size / megabytes, 2) for layer in ours},
        "start_to_ready_s": sorted(
            round(ready, 2) for c in user_path.consumers if (ready := c.start_to_ready()) is not None
        ),
        "stop_to_exit_s": sorted(round(c.stop_to_exit or -1, 2) for c in user_path.consumers),
        "compose_steps_s": user_path.timings,
    }
    record_figures(figures)
    assert figures["image_size_mb"] > 0
    if len(figures["start_to_ready_s"]) < len(user_path.consumers):
        unavailable("the consumers' addresses on the Compose network, from the host (to time start-to-ready)")


def test_each_key_source_works_inside_the_hardened_container(user_path: UserPath) -> None:
    if user_path.kms_missing:
        unavailable(user_path.kms_missing)
    documented = [name for name in user_path.key_checks if "left_as_is" not in name and "root_only" not in name]
    assert len(documented) == 6
    for name in documented:
        code, text = user_path.key_checks[name]
        assert code == 0, f"{name}: {text}"
        assert "✓ configuration valid; masking keys loaded from" in text, name
        assert user_path.key not in text


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("left_as_is", "is owned by uid 1000, neither this process's uid 10001 nor root: run `chown 10001"),
        ("root_only", f"cannot read {TEST_KEYS_DIR}/root_only: Permission denied"),
    ],
    ids=["host-user-0644", "root-0400-without-fsgroup"],
)
def test_a_key_file_mounted_the_wrong_way_is_refused_with_the_fix(user_path: UserPath, name: str, refusal: str) -> None:
    code, text = user_path.key_checks[f"MASKING_KEY_FILE {name}"]
    assert code == 2, text
    assert refusal in text and user_path.key not in text
