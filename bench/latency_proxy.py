"""A TCP proxy that adds a fixed delay to every request, to mimic the round trip to real AWS.

    python bench/latency_proxy.py --latency-ms 20 --upstream 127.0.0.1:4566 [--port 0]

It prints ``listening on <port>`` once ready, then forwards until SIGTERM/SIGINT. Bytes from the
client are held for ``latency-ms`` before they go upstream; replies come back at once. Each HTTP
request therefore pays the delay once, as it would pay one network round trip, while requests
on different connections (or pipelined on one) are delayed side by side, not one after another.

Run as a separate process so that its event loop never competes for the GIL with the client
being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

READ_CHUNK_BYTES = 64 * 1024


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_seconds: float) -> None:
    """Copy reader to writer, each chunk `delay_seconds` after it arrived, in order."""
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await held.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    releaser = asyncio.create_task(release()) if delay_seconds > 0 else None
    try:
        while True:
            data = await reader.read(READ_CHUNK_BYTES)
            if releaser is None:
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                continue
            held.put_nowait((loop.time() + delay_seconds, data))
            if not data:
                await releaser  # everything held has gone out
                break
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        if releaser is not None and not releaser.done():
            releaser.cancel()
        with contextlib.suppress(Exception):
            writer.close()


class LatencyProxy:
    """Accepts connections and relays them upstream, delaying the client-to-server direction."""

    def __init__(self, upstream_host: str, upstream_port: int, latency_seconds: float) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._latency = latency_seconds

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Relay one client connection until either side closes."""
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _forward(client_reader, upstream_writer, self._latency),
            _forward(upstream_reader, client_writer, 0.0),
        )


async def serve(upstream: str, latency_ms: float, host: str, port: int) -> None:
    """Listen until SIGTERM/SIGINT; print the bound port on stdout once ready."""
    up_host, _, up_port = upstream.rpartition(":")
    proxy = LatencyProxy(up_host or "127.0.0.1", int(up_port), latency_ms / 1000)
    server = await asyncio.start_server(proxy.handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the proxy; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="delay added to each request (20)")
    parser.add_argument("--upstream", default="127.0.0.1:4566", help="host:port to forward to (127.0.0.1:4566)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (0)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.upstream, args.latency_ms, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
