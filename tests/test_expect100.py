"""PUTs must not depend on `Expect: 100-continue`.

botocore asks for 100-continue on every PutObject, and its own handling of it misreads a final
response that follows an interim 100 on a kept-alive connection that earlier answered such a
request without one (boto/boto3#3757): the response's headers are lost, the client waits for
a body that never comes, and the PUT hangs until the read timeout. `rclone serve s3` answered
that way once in a CI run: the final flush of a workspace stalled for a minute. This server
plays that sequence on one connection, over real HTTP, with the real client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from wsfs.store.s3 import S3Store

pytestmark = pytest.mark.store

OK = (b"HTTP/1.1 200 OK\r\nETag: \"0\"\r\nContent-Length: 0\r\n"
      b"Connection: keep-alive\r\n\r\n")


def _recv_until(conn: socket.socket, buf: bytearray, ready: Callable[[], bool]) -> None:
    while not ready():
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def _read_request(conn: socket.socket, buf: bytearray) -> dict[str, str]:
    _recv_until(conn, buf, lambda: b"\r\n\r\n" in buf)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    return {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}


def _read_body(conn: socket.socket, buf: bytearray, length: int) -> None:
    _recv_until(conn, buf, lambda: len(buf) >= length)
    del buf[:length]


def _serve(listener: socket.socket, expects: list[bool]) -> None:
    """First request: the final answer at once, before the body. Later ones: a 100 Continue
    first when asked for, then the answer."""
    conn, _ = listener.accept()
    buf = bytearray()
    with conn:
        try:
            while True:
                headers = _read_request(conn, buf)
                expect = headers.get("expect", "").lower() == "100-continue"
                expects.append(expect)
                length = int(headers.get("content-length", "0"))
                if expect and len(expects) > 1:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    _read_body(conn, buf, length)
                    conn.sendall(OK)
                else:
                    conn.sendall(OK)
                    _read_body(conn, buf, length)
        except (ConnectionError, OSError):
            pass


@pytest.mark.timeout(60)
def test_puts_on_one_connection_do_not_wait_for_the_read_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    expects: list[bool] = []
    server = threading.Thread(target=_serve, args=(listener, expects), daemon=True)
    server.start()
    store = S3Store("bucket", "ws", endpoint_url=f"http://127.0.0.1:{port}", path_style=True,
                    read_timeout=20, max_attempts=1, max_pool_connections=1,
                    conditional_writes=False)
    try:
        t = time.monotonic()
        for i in range(3):
            store.put(f"k{i}", b"x" * 1000)
        took = time.monotonic() - t
    finally:
        listener.close()
    assert len(expects) == 3, expects  # one connection served all three
    assert took < 10, f"three PUTs took {took:.1f} s: one waited for the read timeout"
    assert not any(expects), "PUTs still ask for 100-continue"
