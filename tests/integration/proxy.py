"""A TCP proxy for fault injection: cut() drops every connection and refuses new ones; blackhole()
lets every packet vanish, as a network that silently drops them does."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import uuid
from urllib.parse import urlsplit


class TcpProxy:
    """Forwards <listen_host>:<port> (127.0.0.1 unless told) to a target; cut() and blackhole()
    simulate outages, restore() ends them."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0))
        self.host = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._nft_table: str | None = None
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def cut(self) -> None:
        """Close every open connection; new ones are accepted and closed at once."""
        self._up.clear()
        with self._lock:
            for sock in list(self._sockets):
                _close(sock)
            self._sockets.clear()

    @classmethod
    def private(cls, target_host: str, target_port: int) -> TcpProxy:
        """A proxy on an address of its own in 127.0.0.0/8 (any of them is this host's loopback), so
        that blackhole() touches nothing but its connections."""
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        return cls(target_host, target_port, listen_host=address)

    def dsn(self, dsn: str) -> str:
        """A URI `dsn` with this proxy's address and port instead of the server's (user and the rest kept)."""
        parts = urlsplit(dsn)
        user = parts.netloc.rpartition("@")[0]
        return parts._replace(netloc=f"{user + '@' if user else ''}{self.host}:{self.port}").geturl()

    def blackhole(self) -> None:
        """From now on every packet to or from the proxy's address is dropped by the kernel: open
        connections stay open but nothing crosses them, in either direction, not even an ACK, and a
        new connection gets no answer. What a client sees of a black-holed server, a NAT or firewall
        that forgot the connection, a failover. restore() ends it.

        In the kernel (an nftables table of its own), not in the proxy: a proxy that only stopped
        forwarding would still have its kernel acknowledge every byte and answer keepalive probes,
        and the client's TCP would never notice. Needs blackhole_unavailable() to be None.
        """
        if not self.host.startswith("127.") or self.host == "127.0.0.1":
            raise ValueError("blackhole() needs a proxy on an address of its own: TcpProxy.private()")
        if self._nft_table is not None:
            return
        table = f"login_etl_blackhole_{uuid.uuid4().hex[:12]}"
        rules = f"""table ip {table} {{
            chain input {{
                type filter hook input priority -300; policy accept;
                ip daddr {self.host} drop
                ip saddr {self.host} drop
            }}
        }}"""
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True, timeout=10)
        self._nft_table = table

    def restore(self) -> None:
        """End a cut or a black hole: packets flow again, new connections are forwarded."""
        if self._nft_table is not None:
            subprocess.run(["nft", "delete", "table", "ip", self._nft_table], check=True, timeout=10)
            self._nft_table = None
        self._up.set()

    def close(self) -> None:
        self.restore()
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def blackhole_unavailable() -> str | None:
    """Why TcpProxy.blackhole() cannot work here (it needs root and nftables), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "root (TcpProxy.blackhole adds an nftables table)"
    if shutil.which("nft") is None:
        return "nft (nftables)"
    probe = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"nftables ({probe.stderr.strip() or probe.returncode})"
    return None
