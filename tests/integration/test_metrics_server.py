"""The metrics and probes server held against a client that opens connections and never finishes them."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from etl.metrics import Metrics

HALF_SENT = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_half_sent_requests_neither_pin_threads_nor_stay_open_and_the_probe_still_answers() -> None:
    # GIVEN the server of the metrics and probes, on the loopback address only
    port = free_port()
    before = threading.active_count()
    server = Metrics().serve(port, "127.0.0.1")
    try:
        _hold_half_sent_requests(port, before)
    finally:
        server.shutdown()
        server.server_close()


def _hold_half_sent_requests(port: int, before: int) -> None:
    # WHEN a client opens many connections and sends half a request on each
    clients = []
    for _ in range(HALF_SENT):
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        clients.append(client)
    time.sleep(1)
    # THEN the server's threads stay few (an accept loop, a watchdog, a small pool), not one per socket
    assert threading.active_count() - before <= 8, threading.active_count() - before
    # AND within the request timeout (10 s) plus a margin, the server has dropped every one of them
    started = time.monotonic()
    for client in clients:
        client.settimeout(max(0.1, 13 - (time.monotonic() - started)))
        try:
            while client.recv(1024):  # whatever it answers (nothing, or a 400), then the close
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"a half-sent request was still open {time.monotonic() - started:.1f} s later")
        finally:
            client.close()
    assert time.monotonic() - started < 13
    # AND the probe answers afterwards
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as answer:
        assert answer.status in (200, 503)
