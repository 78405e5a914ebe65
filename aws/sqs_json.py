"""JsonTransport: the SQS calls of the hot path, signed by botocore, on a small pool of kept-alive connections.

botocore spends ~1 ms of CPU on each SQS call, most of it around the request rather than in it
(events, endpoint rules, retry bookkeeping, a generic serialiser and parser, urllib3's wrappers:
docs/benchmarks.md, "CPU per message"). This transport keeps what matters of botocore:

- the credentials come from botocore's chain (the client's session: environment, profile, SSO,
  container or instance role) and are read per request, so refreshed credentials are picked up;
- each request is signed by botocore's own SigV4 signer (`botocore.auth.SigV4Auth`); the body is
  the JSON value botocore's serialiser writes, in orjson's compact bytes, and the signature is the
  one botocore's client sends for those bytes (tests/unit/test_sqs_json.py compares them);
- the endpoint is the one botocore resolved for the client (`client.meta.endpoint_url`), once;
- the wire format is SQS's JSON protocol, the one botocore itself speaks to SQS (from 1.34.90):
  `POST /`, `X-Amz-Target: AmazonSQS.<Operation>`, `Content-Type: application/x-amz-json-1.0`,
  `x-amzn-query-mode: true`;
- an error answer is read by botocore's own JSON parser and raised as botocore's `ClientError`,
  and a failed exchange as a `BotoCoreError`, so the caller (aws/sqs.py) maps every error exactly
  as it does for the boto3 client: the same code, the same outcome.

The connections are the standard library's `http.client` ones, kept alive in a LIFO pool: urllib3's
wrappers around the same connection cost ~200 µs of CPU per call more (measured: docs/benchmarks.md).
A plain connection's reads and writes are bounded by the kernel (`kernel_timeouts`), a TLS one's by
Python's socket timeout.
TLS is verified against AWS_CA_BUNDLE's file when the caller passes it, else the bundle botocore
uses by default. Not supported here (config.py picks the boto3 client when one is set): HTTP(S)
proxies; nor client-side retries (the caller's Retrier retries).
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from botocore.auth import SIGNED_HEADERS_BLACKLIST, SigV4Auth
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.httpsession import get_cert_path
from botocore.parsers import create_parser

from aws.http_answer import Answer

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.0"
TARGET_PREFIX = "AmazonSQS."
SIGNING_NAME = "sqs"

Connection = http.client.HTTPConnection
# Plain connections' timeouts are the kernel's where struct timeval is two longs (kernel_timeouts).
KERNEL_TIMEOUTS = sys.platform == "linux"
# A kept connection that came back to the pool less than this ago is used without checking that the
# server has not closed it (a keep-alive timeout is seconds long); an older one is checked first.
UNCHECKED_SECONDS = 1.0


class _Headers(dict[str, str]):
    """The headers to sign, as SigV4Auth reads them (names in lower case, one value each); botocore's
    HTTPHeaders is an email.message.Message, built twice per signature."""

    def get_all(self, name: str) -> list[str]:
        return [self[name]]


# Signing keys derived lately, by (secret key, day, region, service); kept in this process's memory
# only, as botocore keeps the credentials themselves.
_SIGNING_KEYS: dict[tuple[str, str, str, str], bytes] = {}
_SIGNING_KEYS_KEPT = 8
# The canonical request's path and query lines, by URL (an endpoint's: a few at most).
_URL_PARTS: dict[str, str] = {}


class _Signer(SigV4Auth):
    """botocore's SigV4Auth: its string to sign, scope and Authorization header unchanged; the
    canonical request built in one go, the headers to sign read once into a light container, the
    signing key derived once a day (tests/unit/test_sqs_json.py: the same canonical request and
    signature as botocore's)."""

    def signature(self, string_to_sign: str, request: Any) -> str:
        """botocore's signature, the signing key it derives (four HMACs, a fifth of a signature's
        CPU) kept per secret key, day, region and service: it changes once a day."""
        day = request.context["timestamp"][0:8]
        held = (self.credentials.secret_key, day, self._region_name, self._service_name)
        k_signing = _SIGNING_KEYS.get(held)
        if k_signing is None:
            k_date = self._sign(f"AWS4{held[0]}".encode(), day)
            k_signing = self._sign(
                self._sign(self._sign(k_date, self._region_name), self._service_name), "aws4_request"
            )
            if len(_SIGNING_KEYS) >= _SIGNING_KEYS_KEPT:
                _SIGNING_KEYS.clear()
            _SIGNING_KEYS[held] = k_signing
        return str(self._sign(k_signing, string_to_sign, hex=True))

    def canonical_request(self, request: Any) -> str:
        """botocore's canonical request (SigV4Auth.canonical_request), in one go for this transport's
        requests: the endpoint's path and query by botocore's own code, once per URL; the headers to
        sign read once; the payload's SHA-256 (never unsigned: no X-Amz-Content-SHA256 is sent).
        tests/unit/test_sqs_json.py holds it to botocore's text for every hot call."""
        start = _URL_PARTS.get(request.url)
        if start is None:
            parts = urlsplit(request.url)
            start = f"{self._normalize_url_path(parts.path)}\n{self._canonical_query_string_url(parts)}"
            if len(_URL_PARTS) >= _SIGNING_KEYS_KEPT:
                _URL_PARTS.clear()
            _URL_PARTS[request.url] = start
        headers = self.headers_to_sign(request)
        names = sorted(headers)
        canonical = "\n".join([f"{name}:{' '.join(headers[name].split())}" for name in names])
        return f"{request.method.upper()}\n{start}\n{canonical}\n\n{';'.join(names)}\n{self.payload(request)}"

    def headers_to_sign(self, request: Any) -> Any:
        """The headers to sign, read once per request (SigV4Auth asks twice, the headers unchanged)."""
        headers = request.signed
        if headers is None:
            headers = request.signed = _Headers()
            for name, value in request.headers.items():
                lowered = name.lower()
                if lowered not in SIGNED_HEADERS_BLACKLIST:
                    headers[lowered] = value
        return headers


class _Request:
    """What SigV4Auth.add_auth reads and writes of a request; botocore's AWSRequest also prepares a
    URL and a body we already have (a third of the signing time). Its headers are a plain dict:
    this module sets each name in one spelling, as the signer does."""

    __slots__ = ("method", "url", "body", "headers", "context", "params", "signed")

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        self.method = "POST"
        self.url = url
        self.body = body
        self.headers = headers
        self.context: dict[str, Any] = {}
        self.params: dict[str, str] = {}
        self.signed: _Headers | None = None  # the headers to sign, once the signer has read them


class JsonTransport:
    """Sends one SQS operation as a signed JSON request; returns the decoded answer or raises as botocore does."""

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        credentials: Credentials | None,
        *,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
        max_connections: int,
        user_agent: str = "login-etl",
        ca_bundle: str | None = None,
    ) -> None:
        if credentials is None:
            raise NoCredentialsError()
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {endpoint_url!r}")
        self.endpoint_url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"
        self.region = region
        self._path = parts.path.rstrip("/") + "/"
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._netloc = parts.netloc  # the Host header, as botocore signs it
        self._credentials = credentials
        self._user_agent = user_agent
        self._connect_timeout = connect_timeout_seconds
        self._read_timeout = read_timeout_seconds
        self._max_idle = max_connections
        self._idle: list[tuple[Connection, float]] = []  # (connection, time.monotonic() it came back)
        # AWS_CA_BUNDLE's file, else the bundle botocore verifies with by default (certifi's).
        cafile = ca_bundle or get_cert_path(True)
        self._ssl = ssl.create_default_context(cafile=cafile) if self._https else None
        self._parser = create_parser("json")

    def call(
        self, operation: str, params: dict[str, Any], *, before_read: Callable[[int | None], bool] | None = None
    ) -> dict[str, Any]:
        """Send `operation` with `params` (its JSON request members); return the decoded answer.

        `before_read(size)`: called with a successful answer's Content-Length (None if it has none)
        before its body is read; False drops the answer unread (the connection is closed) and {} is
        returned. Raises botocore's ClientError for an error answer (the code as botocore reports
        it) and HTTPClientError when the exchange failed (no answer, or half of one).
        """
        # orjson's compact bytes: the JSON value botocore's serialiser writes (json.dumps, spaced
        # and ASCII-escaped), at a twentieth of its CPU (18 against 0.9 µs for a delete batch);
        # signed over these bytes as botocore signs them (tests/unit/test_sqs_json.py).
        body = orjson.dumps(params)
        request = _Request(self.endpoint_url, body, self._headers(operation))
        # get_frozen_credentials: a refreshable set refreshes here when it is about to expire.
        _Signer(self._credentials.get_frozen_credentials(), SIGNING_NAME, self.region).add_auth(request)
        status, headers, data = self._exchange(body, request.headers, before_read)
        if status < 300:
            try:
                return orjson.loads(data) if data else {}
            except orjson.JSONDecodeError as exc:  # half an answer, or a proxy's page: try again
                raise HTTPClientError(error=exc) from exc
        raise self._error(operation, status, headers, data)

    def _headers(self, operation: str) -> dict[str, str]:
        return {
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": TARGET_PREFIX + operation,
            # SQS's JSON API is query-compatible: with this header an error also names its
            # query-protocol code (x-amzn-query-error), as botocore asks for it.
            "x-amzn-query-mode": "true",
            "User-Agent": self._user_agent,
            "Host": self._netloc,
        }

    def _exchange(
        self, body: bytes, headers: dict[str, str], before_read: Callable[[int | None], bool] | None = None
    ) -> tuple[int, dict[str, str], bytes | bytearray]:
        request = _request_head(self._path, headers, len(body)) + body
        conn, unchecked = self._checkout()
        try:
            return self._over(conn, request, before_read)
        except _NoAnswer as exc:
            if not unchecked:
                raise HTTPClientError(error=exc.error) from exc.error
        # A connection used again without the check had been closed by the server (restarted, or
        # a proxy between): nothing of an answer came, so the request goes once more on a new one.
        # Safe for the hot calls: a receive the server took and did not answer leaves its messages
        # to reappear after their visibility timeout; deletes and visibility changes are idempotent.
        conn, _ = self._checkout(reuse=False)
        try:
            return self._over(conn, request, before_read)
        except _NoAnswer as exc:
            raise HTTPClientError(error=exc.error) from exc.error

    def _over(
        self, conn: Connection, request: bytes, before_read: Callable[[int | None], bool] | None
    ) -> tuple[int, dict[str, str], bytes | bytearray]:
        """One exchange on `conn`; raises _NoAnswer when the server had closed it (reset, or EOF before
        the status line), HTTPClientError for any other failure."""
        try:
            # The request in one write, the answer read back with one buffer (aws/http_answer.py):
            # http.client's own request path checks each header with a regex and writes the head and
            # the body apart, and its response reads through a file object made for each answer.
            sock = conn.sock
            assert sock is not None
            try:
                sock.sendall(request)
                answer = Answer(sock)
            except (ConnectionResetError, BrokenPipeError) as exc:  # RemoteDisconnected is one
                conn.close()
                raise _NoAnswer(exc) from exc
            if before_read is not None and answer.status < 300 and not before_read(answer.length):
                conn.close()
                logger.info("an answer of %s bytes was left unread: the loop is stopping", answer.length)
                return answer.status, {}, b""
            data = answer.read()
        except BlockingIOError as exc:  # a kernel timeout ran out (kernel_timeouts)
            conn.close()
            raise HTTPClientError(error=TimeoutError(f"no answer within {self._read_timeout} s")) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise HTTPClientError(error=exc) from exc
        if answer.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return answer.status, answer.headers, data

    def _checkout(self, *, reuse: bool = True) -> tuple[Connection, bool]:
        """A connection, and whether it was taken from the pool without the check that the server
        has not closed it (it came back less than UNCHECKED_SECONDS ago)."""
        # No lock: list.pop and list.append are atomic, and a lock here is contended by every
        # receiver and deleter thread (measured: the pool's lock was a tenth of the transport's CPU).
        while reuse:
            try:
                conn, returned_at = self._idle.pop()
            except IndexError:
                break
            # The check is a system call, and a hand-off of the GIL, per call: a connection that
            # came back a moment ago is used without it (the exchange tries once more if the
            # server had closed it after all). One idle longer may have met a keep-alive timeout.
            if time.monotonic() - returned_at < UNCHECKED_SECONDS:
                return conn, True
            if not _dropped(conn):
                return conn, False
            conn.close()
        fresh: Connection
        if self._ssl is not None:
            fresh = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._connect_timeout, context=self._ssl
            )
        else:
            fresh = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
        try:
            fresh.connect()
        except OSError as exc:
            fresh.close()
            raise HTTPClientError(error=exc) from exc
        assert fresh.sock is not None
        # A long poll must not look like a hang: every read and write is bounded by the read timeout.
        if self._ssl is None and KERNEL_TIMEOUTS:
            kernel_timeouts(fresh.sock, self._read_timeout)
        else:
            fresh.sock.settimeout(self._read_timeout)
        return fresh, False

    def _checkin(self, conn: Connection) -> None:
        if len(self._idle) < self._max_idle:  # racy by design: at most a few more kept than asked
            self._idle.append((conn, time.monotonic()))
        else:
            conn.close()

    def _error(self, operation: str, status: int, headers: dict[str, str], body: bytes | bytearray) -> ClientError:
        """botocore's own reading of an error answer (code, message, query-compatible code)."""
        parsed = self._parser.parse({"status_code": status, "headers": dict(headers), "body": bytes(body)}, None)
        return ClientError(parsed, operation)

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            try:
                self._idle.pop()[0].close()
            except IndexError:
                break


def _request_head(path: str, headers: dict[str, str], length: int) -> bytes:
    """A POST's request line and header block, as http.client writes them (Host and the headers
    given, no Accept-Encoding, then Content-Length). A name or value holding a line break is
    refused, as http.client refuses it (no header can be smuggled in)."""
    lines = [f"POST {path} HTTP/1.1", *[f"{name}: {value}" for name, value in headers.items()]]
    lines += [f"Content-Length: {length}", "", ""]
    head = "\r\n".join(lines)
    if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
        raise ValueError("a request header holds a line break")
    return head.encode("latin-1")


class _NoAnswer(Exception):
    """The server had closed the connection: reset, or closed before the first byte of an answer."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound each read and write of a plain (not TLS) socket by `seconds` in the kernel
    (SO_RCVTIMEO, SO_SNDTIMEO), the socket left blocking.

    A socket with a Python timeout polls before every recv and send: two system calls, and two
    hand-offs of the GIL, where one does (a fifth of the ETL's CPU per SQS call on 2 cores,
    docs/benchmarks.md). A read that times out fails with EAGAIN (BlockingIOError), which the
    exchange reports as a timeout. Not for TLS: the ssl module retries a blocking socket's
    timed-out read for ever, so a TLS connection keeps its Python timeout."""
    whole, fraction = divmod(seconds, 1)
    interval = struct.pack("ll", int(whole), int(fraction * 1_000_000))  # struct timeval (Linux)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)


def _dropped(conn: Connection) -> bool:
    """True when a kept-alive connection was closed by the server (readable while idle means EOF)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
