"""A store that only reads: what a read-only mount (`wsfs mount -o ro`) is given.

A read-only mount takes no lease and must never change the store it shares with the writer
(no manifest, no HEAD, no repack, no deletion): this wrapper makes that a property of its
object graph rather than of every caller's care. Every write raises ReadOnlyStoreError,
which nothing catches as an outage (it is no TransientStoreError): a write attempted here is
a bug, and fails loudly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import StoreError
from .base import ObjectStore


class ReadOnlyStoreError(StoreError):
    """A write was attempted through a read-only mount's store."""


class ReadOnlyStore:
    """`inner`, read-only."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:  # what the interface lacks (list_detailed, ...)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"ReadOnlyStore({self.inner!r})"

    def _refuse(self, what: str, key: str) -> ReadOnlyStoreError:
        return ReadOnlyStoreError(f"a read-only mount must not {what} {key} in {self.url}")

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        return self.inner.get_tagged(key)

    def head(self, key: str) -> int | None:
        return self.inner.head(key)

    def put(self, key: str, data: bytes) -> None:
        raise self._refuse("write", key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        raise self._refuse("write", key)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        raise self._refuse("write", key)

    def delete(self, key: str) -> None:
        raise self._refuse("delete", key)

    def delete_many(self, keys: list[str]) -> None:
        raise self._refuse("delete", ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else ""))

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)
