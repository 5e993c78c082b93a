"""The object-store interface: the handful of operations wsfs needs from S3 or a directory.

Methods are synchronous and blocking on purpose: callers above run them in worker threads
(`trio.to_thread.run_sync` behind a `CapacityLimiter`), never in the trio thread.
"""

from collections.abc import Iterator
from typing import Protocol

from wsfs.errors import StoreError


class TransientStoreError(StoreError):
    """A store failure that may go away by itself: retry it with backoff."""

    transient = True


# Key components starting with this are wsfs's own scratch names (temp files of the directory
# store, probe objects), never objects: `check_key` refuses them and `list` skips them.
RESERVED_PREFIX = ".wsfs-"
TEMP_PREFIX = RESERVED_PREFIX + "tmp-"


def check_key(key: str) -> None:
    """Raise ValueError unless `key` is a well-formed object key.

    Keys are '/'-separated relative paths with no empty, '.' or '..' component. The same rules
    hold for every store, so a key that works on S3 also works on the directory store (where it
    is a file path) and on `rclone serve s3` (which rejects '//' and stores 'dir/' as a file).
    Components starting with `RESERVED_PREFIX` are wsfs's scratch names.
    A bad key is a bug in wsfs, not a user error, hence ValueError.
    """
    if not key or key.startswith("/") or key.endswith("/") or "\0" in key:
        raise ValueError(f"invalid object key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", "..") or part.startswith(RESERVED_PREFIX):
            raise ValueError(f"invalid object key {key!r}")



class NoSuchKey(KeyError):
    """The object does not exist."""


class ObjectStore(Protocol):
    """A flat key → bytes namespace with atomic whole-object writes."""

    url: str  # printable location, without credentials

    def get(self, key: str) -> bytes:
        """Return the whole object; raise `NoSuchKey` if it does not exist."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return `length` bytes from `start` (fewer at the end); raise `NoSuchKey`."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write the whole object atomically (readers see the old or the new object)."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has that key; return False if one exists."""
        ...

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """Return the whole object and its ETag; raise `NoSuchKey` if it does not exist."""
        ...

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object only if its ETag is still `etag`: return the new ETag, or None
        if the object changed since or is gone (S3 `If-Match`). Where the server ignores
        the header (`conditional_writes` false) this is a compare then a put, not atomic."""
        ...

    def head(self, key: str) -> int | None:
        """Return the object's size, or None if it does not exist."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        ...

    def delete_many(self, keys: list[str]) -> None:
        """Delete several objects (batched where the store allows)."""
        ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield (key, size) for every object whose key starts with `prefix`, in key order."""
        ...
