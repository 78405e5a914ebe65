"""The HTTP server of the metrics and the probes: a small pool, and a deadline on every request.

Anyone who can reach the port can open connections, and the probes share it: a server that starts a
thread per connection and never drops one (wsgiref's with ThreadingMixIn) can be pinned by a few
hundred half-sent requests until /livez fails and the orchestrator restarts a healthy ETL. This one:

- answers with `workers` threads; connections beyond them wait in a queue of at most `queued`, and
  one more than that is closed at once (shed, counted nowhere: a scraper retries);
- drops a connection `timeout_seconds` after it was accepted, whether it is still waiting for a
  worker, sending its request slowly, or not reading the answer: one watchdog thread shuts its
  socket down, which ends the worker's blocked read or write.

So the threads are bounded (one accepting, one watchdog, `workers`), and so are the open sockets.
Bind to a specific address (`--metrics-address`) where the port must not be open to every interface.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 10.0
WORKERS = 4
QUEUED_CONNECTIONS = 32
_WATCHDOG_INTERVAL_SECONDS = 0.5

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """No access log: probes would write a line every few seconds."""


class BoundedWsgiServer(WSGIServer):
    """wsgiref's server with a bounded pool and a per-connection deadline (see the module docstring)."""

    request_queue_size = QUEUED_CONNECTIONS  # the listen backlog

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[WSGIRequestHandler],
        *,
        workers: int = WORKERS,
        queued: int = QUEUED_CONNECTIONS,
        timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        if workers < 1 or queued < 0 or timeout_seconds <= 0:
            raise ValueError("workers >= 1, queued >= 0 and timeout_seconds > 0")
        # Before binding: a failed bind calls server_close().
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metrics-worker")
        self._capacity = workers + queued
        self._timeout = timeout_seconds
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._closed = threading.Event()
        super().__init__(address, handler)
        threading.Thread(target=self._watch, name="metrics-watchdog", daemon=True).start()

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed (in a worker or waiting for one)."""
        with self._lock:
            return len(self._deadlines)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = len(self._deadlines) >= self._capacity
            if not full:
                self._deadlines[request] = time.monotonic() + self._timeout
        if full:
            self.shutdown_request(request)
            return
        self._pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError:
            pass  # dropped by the watchdog, or the client went away
        except Exception:  # noqa: BLE001 - socketserver's own policy: report and go on
            self.handle_error(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(request, None)
            self.shutdown_request(request)

    def _watch(self) -> None:
        while not self._closed.wait(_WATCHDOG_INTERVAL_SECONDS):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, deadline in self._deadlines.items() if deadline <= now]
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the worker's read or write ends; it closes the socket
                except OSError:
                    pass

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(app: WsgiApp, port: int, address: str, **limits: Any) -> BoundedWsgiServer:
    """Serve `app` on address:port from a daemon thread; raise OSError if it cannot bind."""
    server = BoundedWsgiServer((address, port), _QuietHandler, **limits)
    server.set_app(app)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server
