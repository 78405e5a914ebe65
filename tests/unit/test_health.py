"""The Kubernetes probes (/livez, /readyz): answered from memory, alive through outages, failing only
for a consume loop stuck in one call. No network: the WSGI app is called directly."""

from __future__ import annotations

import threading
from typing import Any

from etl.metrics import Metrics
from etl.pipeline import Pipeline
from etl.probes import Health
from tests import fakes
from tests.fakes import FakeClock, FakeQueue, FakeSink, WriteWaits


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call(app: Any, path: str) -> tuple[str, str]:
    """GET `path` from a WSGI app: (status line, body)."""
    seen: list[str] = []
    chunks = app(
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "wsgi.url_scheme": "http",
            "SERVER_NAME": "test",
            "SERVER_PORT": "9108",
            "SERVER_PROTOCOL": "HTTP/1.1",
        },
        lambda status, headers, exc_info=None: seen.append(status),
    )
    return seen[0], b"".join(chunks).decode()


def test_live_while_starting_ready_once_running_and_not_while_stopping() -> None:
    clock = ManualClock()
    health = Health(stall_seconds=300, clock=clock)
    assert health.live() == (True, "starting") and health.ready() == (False, "starting")
    clock.now += 10_000  # a start-up that waits (a schema lock held elsewhere) is not a stall
    assert health.live()[0]
    stopping = threading.Event()
    health.running(stopping.is_set)
    assert health.live()[0] and health.ready() == (True, "ready")
    stopping.set()
    assert health.live()[0] and health.ready() == (False, "stopping: finishing the batch in hand")


def test_not_live_once_the_loop_has_not_moved_for_the_stall_time_and_live_again_when_it_moves() -> None:
    clock = ManualClock()
    health = Health(stall_seconds=300, clock=clock)
    health.running(lambda: False)
    clock.now += 300
    assert health.live()[0]
    clock.now += 1
    ok, text = health.live()
    assert not ok and text == "stalled: the consume loop has not moved for 301 s"
    assert health.ready()[0]  # readiness is about stopping, not about progress
    health.beat()
    assert health.live()[0]


def test_the_app_serves_the_probes_and_the_metrics_and_nothing_else() -> None:
    clock = ManualClock()
    metrics = Metrics(Health(stall_seconds=300, clock=clock))
    app = metrics.wsgi_app()
    assert call(app, "/livez") == ("200 OK", "starting\n")
    assert call(app, "/readyz") == ("503 Service Unavailable", "starting\n")
    metrics.health.running(lambda: False)
    assert call(app, "/readyz") == ("200 OK", "ready\n")
    clock.now += 301
    assert call(app, "/livez")[0] == "503 Service Unavailable"
    status, text = call(app, "/metrics")
    assert status.startswith("200") and "login_etl_messages_received_total" in text


def test_an_idle_writer_keeps_the_process_live() -> None:
    """An empty queue in --follow: nothing committed for hours is not a stall; the writer still turns."""
    clock = ManualClock()
    metrics = Metrics(Health(stall_seconds=300, clock=clock))
    sink = FakeSink()
    pipeline = Pipeline(
        FakeQueue([], stored=sink.holds), sink, fakes.MASKER, fakes.options(follow=True), observer=metrics
    )
    metrics.health.running(lambda: pipeline.stopping)
    thread, _outcome = fakes.run_in_thread(pipeline)
    try:
        for _ in range(3):
            clock.now += 10_000
            fakes.wait_until(lambda: metrics.health.live()[0])
    finally:
        pipeline.stop()
        thread.join(10)


def test_a_database_outage_of_hours_keeps_the_process_live() -> None:
    """The retries beat: a probe must not restart pods because PostgreSQL is away."""
    fake = FakeClock()
    metrics = Metrics(Health(stall_seconds=300, clock=fake.now))
    sink = fakes.FailingSink(failures=float("inf"))
    queue = FakeQueue(fakes.bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, fakes.MASKER, fakes.options(follow=True), observer=metrics, clock=fake)
    metrics.health.running(lambda: pipeline.stopping)
    thread, _outcome = fakes.run_in_thread(pipeline)
    samples = []
    try:
        while sink.attempts < 5_000:
            samples.append(metrics.health.live()[0])
        assert fake.now() - 1000 > 4 * 3600  # hours of (fake) outage went by
    finally:
        pipeline.stop()
        thread.join(10)
    assert samples and all(samples)


def test_a_writer_stuck_in_one_call_is_not_live() -> None:
    clock = ManualClock()
    entered, release = threading.Event(), threading.Event()

    metrics = Metrics(Health(stall_seconds=300, clock=clock))
    sink = WriteWaits(entered, release, wait_seconds=10)  # a call that neither returns nor fails
    pipeline = Pipeline(
        FakeQueue(fakes.bodies(5), stored=sink.holds),
        sink,
        fakes.MASKER,
        fakes.options(follow=True, flush_seconds=0),
        observer=metrics,
    )
    metrics.health.running(lambda: pipeline.stopping)
    thread, _outcome = fakes.run_in_thread(pipeline)
    try:
        assert entered.wait(10)
        clock.now += 301
        assert metrics.health.live() == (False, "stalled: the consume loop has not moved for 301 s")
    finally:
        release.set()
        pipeline.stop()
        thread.join(10)
    assert len(sink.logins) == 5
