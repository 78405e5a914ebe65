"""One HTTP/1.1 answer read from a socket: what the JSON transport (aws/sqs_json.py) reads back.

http.client's HTTPResponse wraps the socket in a buffered file object for each answer, reads its
header block line by line through the email package, and closes the file again: about a fifth of
the ETL's CPU per message on the hot path (docs/benchmarks.md, "CPU per message"). `Answer` reads
the same bytes with one buffer: a `recv` or two for the head (and, for SQS's small answers, the
body with it), the rest of a long body appended as it arrives (never allocated ahead of it).

What it reads is what HTTPResponse reads, as HTTPResponse reads it (tests/unit/test_sqs_json.py
compares the two on the same bytes, in every split): the status line (a 100 Continue skipped; other
1xx answers returned, bodiless, as http.client returns them), the header fields (a repeated
field's values joined, folded lines unfolded; the answer framed by the first Content-Length,
Transfer-Encoding and Connection, as http.client frames it), the body by Content-Length, by chunks
(Transfer-Encoding: chunked, trailers dropped), or until the connection closes; whether the
connection closes after it (HTTP/1.0 without keep-alive, ``Connection: close``, no length). A
malformed or cut answer raises http.client's exception for it (HTTPException, or OSError from the
socket), and the caller drops the connection. Bytes past the end of an answer that came with it (no
request was pipelined: none should come) make `will_close` true; later ones are found by the pool's
check before a connection idle a second or more is used again (aws/sqs_json.py, `_dropped`), or
fail the next exchange on it as a malformed answer.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any

# As http.client: the longest line and the most header fields it reads.
MAX_LINE = 65536
MAX_HEADERS = 100
RECV_BYTES = 65536
BODY_RECV_BYTES = 1 << 18  # the most one read of a long body asks for
_NO_BODY = (http.client.NO_CONTENT, http.client.NOT_MODIFIED)


class Fields(dict[str, str]):
    """Response header fields by lower-case name (a repeated field's values joined by ", "), and
    each field's first value (`first`: what http.client frames an answer by when one repeats)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, str] = {}

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


def parse_fields(lines: list[bytes]) -> Fields:
    """The header fields of `lines` (each as read, its line break included)."""
    fields = Fields()
    name = ""
    for raw in lines:
        line = raw.decode("iso-8859-1").rstrip("\r\n")
        if not line:
            continue
        if line[0] in " \t" and name:  # an obsolete folded continuation
            fields[name] += " " + line.strip()
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
        fields.first.setdefault(name, value)
    return fields


class Answer:
    """The answer to the request just sent on `sock`: its head is read at construction (`status`,
    `headers`, `length`: the Content-Length or None, `will_close`); `read()` reads its body."""

    __slots__ = ("_sock", "_buffer", "_at", "status", "reason", "headers", "length", "chunked", "will_close")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._at = 0  # where the unread bytes of _buffer begin
        while True:
            version, self.status, self.reason = self._status_line()
            lines = self._header_lines()
            if self.status != http.client.CONTINUE:
                break
        if version in ("HTTP/1.0", "HTTP/0.9"):
            http11 = False
        elif version.startswith("HTTP/1."):
            http11 = True
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = parse_fields(lines)
        first = self.headers.first  # a repeated framing field: its first value, as http.client
        self.chunked = (first.get("transfer-encoding") or "").lower() == "chunked"
        self.will_close = _closes(first, http11)
        self.length: int | None = None
        declared = first.get("content-length")
        if declared and not self.chunked:
            try:
                self.length = int(declared)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if self.status in _NO_BODY or 100 <= self.status < 200:
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def read(self) -> bytes | bytearray:
        """The whole body (by its length, its chunks, or until the connection closes)."""
        body: bytes | bytearray
        if self.chunked:
            body = self._chunks()
        elif self.length is not None:
            body = self._exactly(self.length)
        else:
            body = self._until_closed()
        if self._at < len(self._buffer):
            self.will_close = True  # more than the answer came: do not trust the connection again
        return body

    # -- the head -----------------------------------------------------------------------------------

    def _status_line(self) -> tuple[str, int, str]:
        raw = self._line("status line", first=True)
        line = raw.decode("iso-8859-1")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise http.client.BadStatusLine(line)
        try:
            status = int(parts[1])
        except ValueError:
            raise http.client.BadStatusLine(line) from None
        if not 100 <= status <= 999:
            raise http.client.BadStatusLine(line)
        return parts[0], status, parts[2].strip() if len(parts) > 2 else ""

    def _header_lines(self) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = self._line("header line")
            if line in (b"\r\n", b"\n", b""):
                return lines
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")

    # -- the bytes ----------------------------------------------------------------------------------

    def _more(self) -> bool:
        """Read what the socket has into the buffer; False at the end of the stream."""
        if self._at:
            del self._buffer[: self._at]
            self._at = 0
        chunk = self._sock.recv(RECV_BYTES)
        self._buffer += chunk
        return bool(chunk)

    def _line(self, what: str, *, first: bool = False) -> bytes:
        """The next line, its line break included (b"" at the end of the stream)."""
        end = self._buffer.find(b"\n", self._at)
        while end < 0:
            if len(self._buffer) - self._at > MAX_LINE:
                raise http.client.LineTooLong(what)
            if not self._more():
                if first and self._at == len(self._buffer):
                    raise http.client.RemoteDisconnected("Remote end closed connection without response")
                line = bytes(self._buffer[self._at :])
                self._at = len(self._buffer)
                return line
            end = self._buffer.find(b"\n", self._at)
        if end + 1 - self._at > MAX_LINE:
            raise http.client.LineTooLong(what)
        line = bytes(self._buffer[self._at : end + 1])
        self._at = end + 1
        return line

    def _exactly(self, count: int) -> bytes | bytearray:
        """The next `count` bytes: from the buffer, else grown as they arrive (never allocated ahead
        of them: a Content-Length is the server's word, not yet bytes in hand)."""
        if count < 0:
            raise http.client.IncompleteRead(b"", count)
        held = len(self._buffer) - self._at
        if held >= count:
            data = self._buffer[self._at : self._at + count]  # a copy already: no bytes() of it
            self._at += count
            return data
        body = self._buffer[self._at :]
        self._buffer, self._at = bytearray(), 0
        while len(body) < count:
            chunk = self._sock.recv(min(count - len(body), BODY_RECV_BYTES))
            if not chunk:
                raise http.client.IncompleteRead(bytes(body), count - len(body))
            body += chunk
        return body

    def _until_closed(self) -> bytes:
        while self._more():
            pass
        data = bytes(self._buffer[self._at :])
        self._at = len(self._buffer)
        return data

    def _chunks(self) -> bytes:
        parts: list[bytes | bytearray] = []
        while True:
            line = self._line("chunk size")
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise http.client.IncompleteRead(b"".join(parts)) from None
            if size < 0:
                raise http.client.IncompleteRead(b"".join(parts))
            if size == 0:
                break
            parts.append(self._exactly(size))
            self._exactly(2)  # the CRLF after the chunk's data
        while self._line("trailer line") not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts)


def _closes(headers: dict[str, str], http11: bool) -> bool:
    """Whether the server closes the connection after this answer (http.client's reading)."""
    connection = headers.get("connection")
    if http11:
        return bool(connection and "close" in connection.lower())
    if headers.get("keep-alive"):
        return False
    if connection and "keep-alive" in connection.lower():
        return False
    proxy = headers.get("proxy-connection")
    return not (proxy and "keep-alive" in proxy.lower())
