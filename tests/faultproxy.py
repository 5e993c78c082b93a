"""A fault-injecting HTTP proxy for tests: wsfs talks to it, it talks to a real S3 server.

It sits between wsfs (whose --endpoint-url / AWS_ENDPOINT_URL points at `FaultProxy.url`) and a
real S3 server on 127.0.0.1, and injects the faults real object stores have, switchable while
a mount runs:

- pass-through (the default);
- HTTP errors (500 InternalError, 503 ServiceUnavailable, 503 SlowDown) with an S3 XML body,
  for a fraction of requests or all of them, optionally only for some methods;
- connection resets (RST after the request was read), for a fraction of requests;
- stalls: requests are read and never answered until the stall ends, then reset;
- delays: requests are held until the delay ends, then forwarded (they land late);
- full outages: the listening socket is closed, so connections are refused, and every
  connection in flight is reset; the same port is listened on again when the outage ends;
- a bandwidth limit on what is sent upstream (request bodies: the uploads), shared by all
  connections like an uplink, e.g. to time a container's stop against its grace period.

Each request gets a connection of its own (the proxy rewrites `Connection: close` into the
request it forwards), so a fault decided per connection is a fault per request, and the proxy
never needs to parse responses: it relays bytes until the server closes. Plain threads: the
proxy lives in the pytest process, not in wsfs.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

ERRORS = {
    "InternalError": (500, "Internal Server Error",
                      "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service Unavailable", "Please reduce your request rate."),
    "SlowDown": (503, "Slow Down", "Please reduce your request rate."),
}


@dataclass
class _Rule:
    """What happens to the next requests: pass, error, reset or stall."""

    kind: str = "pass"
    fraction: float = 1.0
    code: str = "ServiceUnavailable"
    methods: frozenset[str] | None = None
    until: float = float("inf")  # monotonic time the rule ends (stalls and outages)
    path: str | None = None  # only requests whose target contains this (e.g. "/data/")

    def applies(self, method: str, target: str) -> bool:
        if self.kind == "pass" or time.monotonic() >= self.until:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.path is not None and self.path not in target:
            return False
        return random.random() < self.fraction


class FaultProxy:
    """A TCP/HTTP forwarder on 127.0.0.1 whose faults the test switches at runtime."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname and parts.port, upstream
        self.upstream = (parts.hostname, parts.port)
        self._rule = _Rule()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outage_until = 0.0
        self._active: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.stats: Counter[str] = Counter()
        self._uplink: _Uplink | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._reset_active()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- switching faults ------------------------------------------------------------------

    def pass_through(self) -> None:
        """No faults from now on (an outage in progress ends too)."""
        with self._lock:
            self._rule = _Rule()
            self._outage_until = 0.0

    def errors(self, fraction: float = 1.0, code: str = "ServiceUnavailable",
               methods: Iterable[str] | None = None, seconds: float | None = None,
               path: str | None = None) -> None:
        """Answer `fraction` of requests with an S3 error (`code` is a key of ERRORS)."""
        assert code in ERRORS, code
        self._set(_Rule("error", fraction, code, _methods(methods), _until(seconds), path))

    def resets(self, fraction: float = 1.0, methods: Iterable[str] | None = None,
               seconds: float | None = None) -> None:
        """Reset `fraction` of connections after reading their request."""
        self._set(_Rule("reset", fraction, methods=_methods(methods), until=_until(seconds)))

    def stall(self, seconds: float, methods: Iterable[str] | None = None,
              path: str | None = None) -> None:
        """For `seconds`, read requests and never answer them; reset them when it ends."""
        self._set(_Rule("stall", 1.0, methods=_methods(methods), until=_until(seconds),
                        path=path))

    def delay(self, seconds: float, methods: Iterable[str] | None = None,
              path: str | None = None) -> None:
        """For `seconds` (or until the rule is switched), hold matching requests, then
        forward them: they land late, as a request stalled in a network does."""
        self._set(_Rule("delay", 1.0, methods=_methods(methods), until=_until(seconds),
                        path=path))

    def outage(self, seconds: float) -> None:
        """Refuse every connection for `seconds` (and reset those in flight)."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
        self.stats["outages"] += 1
        self._reset_active()

    def throttle(self, bytes_per_second: float | None) -> None:
        """Carry at most `bytes_per_second` of request bodies upstream, all connections
        together (None: no limit). Faults are independent of it."""
        with self._lock:
            self._uplink = None if bytes_per_second is None else _Uplink(bytes_per_second)

    def outage_active(self) -> bool:
        return time.monotonic() < self._outage_until

    def _set(self, rule: _Rule) -> None:
        with self._lock:
            self._rule = rule

    # -- the accept loop -------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        s.settimeout(0.1)
        return s

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.outage_active():
                if self._listener is not None:
                    self._listener.close()  # connect() now gets ECONNREFUSED
                    self._listener = None
                time.sleep(0.05)
                continue
            if self._listener is None:
                try:
                    self._listener = self._listen(self.port)
                except OSError:
                    time.sleep(0.05)  # the old socket's port is not free yet
                    continue
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            with self._lock:
                self._active.add(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        if self._listener is not None:
            self._listener.close()

    def _reset_active(self) -> None:
        with self._lock:
            conns = list(self._active)
        for c in conns:
            _reset(c, wake=True)

    # -- one request -----------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        try:
            if self.outage_active():  # accepted in the moment before the listener closed
                _reset(client)
                return
            self._handle_request(client)
        except OSError:
            pass  # a connection we (or the client) reset
        finally:
            with self._lock:
                self._active.discard(client)
            with contextlib.suppress(OSError):
                client.close()

    def _handle_request(self, client: socket.socket) -> None:
        client.settimeout(60)
        reader = _Reader(client)
        head = reader.until(b"\r\n\r\n")
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, _, target = lines[0].partition(" ")
        headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:]
                                                          if ln)]
        lower = {k.lower(): v for k, v in headers}
        if lower.get("expect", "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in lower.get("transfer-encoding", "").lower():
            body = reader.chunked()
        else:
            body = reader.exactly(int(lower.get("content-length", "0") or 0))
        self.stats["requests"] += 1
        with self._lock:
            rule = self._rule
        if rule.applies(method, target) and rule.kind == "delay":
            self.stats["delay"] += 1
            while (time.monotonic() < rule.until and self._rule is rule
                   and not self._stop.is_set()):
                time.sleep(0.05)
        elif rule.applies(method, target):
            self.stats[rule.kind] += 1
            if rule.kind == "error":
                client.sendall(_error_response(rule.code))
                return
            if rule.kind == "stall":
                while (time.monotonic() < rule.until and self._rule is rule
                       and not self._stop.is_set()):
                    time.sleep(0.05)
            _reset(client)
            return
        self.stats["forwarded"] += 1
        kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "expect",
                                                                "keep-alive")]
        new_head = "\r\n".join([lines[0], *(f"{k}: {v}" for k, v in kept),
                                "Connection: close", "", ""]).encode("latin-1")
        with self._lock:
            uplink = self._uplink
        with socket.create_connection(self.upstream, timeout=120) as up:
            if uplink is None:
                up.sendall(new_head + body)
            else:
                up.sendall(new_head)
                for start in range(0, len(body), _Uplink.CHUNK):
                    chunk = body[start:start + _Uplink.CHUNK]
                    uplink.take(len(chunk))
                    up.sendall(chunk)
                self.stats["throttled_bytes"] += len(body)
            while chunk := up.recv(65536):
                client.sendall(chunk)


class _Uplink:
    """A bandwidth shared by every connection: each chunk waits for its slot in time."""

    CHUNK = 64 * 1024

    def __init__(self, rate: float) -> None:
        assert rate > 0, rate
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = time.monotonic()  # when the link has sent everything booked so far

    def take(self, n: int) -> None:
        """Book `n` bytes on the link and wait until they would have gone through it."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + n / self.rate
            wait = self._free_at - now
        time.sleep(wait)


class _Reader:
    """Buffered reads of an HTTP request from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def until(self, sep: bytes) -> bytes | None:
        while sep not in self.buf:
            if not self._more():
                return None
        head, _, self.buf = self.buf.partition(sep)
        return head

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise ConnectionResetError("the client closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def chunked(self) -> bytes:
        """Return the raw chunked body (forwarded as it is), up to and including its end."""
        out = b""
        while True:
            line = self.until(b"\r\n")
            if line is None:
                raise ConnectionResetError("the client closed mid-body")
            out += line + b"\r\n"
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (trailer := self.until(b"\r\n")) not in (None, b""):
                    out += trailer + b"\r\n"
                return out + b"\r\n"
            out += self.exactly(size + 2)


def _error_response(code: str) -> bytes:
    status, reason, message = ERRORS[code]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def _reset(sock: socket.socket, wake: bool = False) -> None:
    """Close with RST (SO_LINGER 0), which the client sees as 'connection reset by peer'.

    `wake`: the socket belongs to another thread, maybe blocked in recv; close() alone would
    not wake it (the blocked call keeps the socket alive), shutdown() does.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if wake:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return  # its own thread closes it
    with contextlib.suppress(OSError):
        sock.close()


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    return None if methods is None else frozenset(m.upper() for m in methods)


def _until(seconds: float | None) -> float:
    return float("inf") if seconds is None else time.monotonic() + seconds
