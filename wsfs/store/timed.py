"""A store that times every request of the store it wraps, by kind, and counts failures.

Composed on the `ObjectStore` interface like any other wrapper, so the daemon's metrics see
every request from the first one of the mount (the lease, the checkpoint download): an
outage that starts at mount time shows in `wsfs_store_errors_total` at once. A missing key
(`NoSuchKey`, `head` -> None) is an answer, not a failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any, TypeVar

from ..latency import SharedLatencies
from .base import NoSuchKey, ObjectStore

T = TypeVar("T")

KINDS = ("get", "get_range", "put", "put_if_absent", "put_if_match", "head", "delete",
         "delete_many", "list")


class TimedStore:
    """`inner`, with each request's duration observed in `latencies` under its kind."""

    def __init__(self, inner: ObjectStore, latencies: SharedLatencies) -> None:
        self.inner = inner
        self.url = inner.url
        self.latencies = latencies

    def __getattr__(self, name: str) -> Any:  # what the interface lacks (list_detailed, ...)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"TimedStore({self.inner!r})"

    def _timed(self, kind: str, request: Callable[..., T], *args: Any) -> T:
        start = perf_counter()
        try:
            return request(*args)
        except NoSuchKey:
            raise
        except Exception:
            self.latencies.failed(kind)
            raise
        finally:
            self.latencies.observe(kind, perf_counter() - start)

    def get(self, key: str) -> bytes:
        return self._timed("get", self.inner.get, key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._timed("get_range", self.inner.get_range, key, start, length)

    def put(self, key: str, data: bytes) -> None:
        self._timed("put", self.inner.put, key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._timed("put_if_absent", self.inner.put_if_absent, key, data)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        return self._timed("get", self.inner.get_tagged, key)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        return self._timed("put_if_match", self.inner.put_if_match, key, data, etag)

    def head(self, key: str) -> int | None:
        return self._timed("head", self.inner.head, key)

    def delete(self, key: str) -> None:
        self._timed("delete", self.inner.delete, key)

    def delete_many(self, keys: list[str]) -> None:
        self._timed("delete_many", self.inner.delete_many, keys)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """The whole listing, however many pages, counts as one request."""
        start = perf_counter()
        try:
            yield from self.inner.list(prefix)
        except Exception:
            self.latencies.failed("list")
            raise
        finally:
            self.latencies.observe("list", perf_counter() - start)
