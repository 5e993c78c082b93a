"""The embedded object store: a plain directory holding each object as the file `root/<key>`.

It is the default store (no server needed) and the reference the S3 store is tested against.
Whole-object atomicity comes from the usual recipe: write a temp file in the target directory,
fsync it, rename it over the target, then fsync the directory so the rename itself survives a
crash (fsync of the file alone does not persist its directory entry). Temp files are named
`TEMP_PREFIX*`, which `check_key` forbids as a key component, so `list` can skip them and a
crashed writer's leftovers are never mistaken for objects.

Keys map to paths, so a key cannot also be a "directory" of another key ('a' and 'a/b'); wsfs's
key layout never does that. Empty directories are removed on delete, like `rclone serve s3` does,
so that deleting 'a/b' frees the name 'a'.
"""

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from wsfs.errors import StoreError
from wsfs.store.base import TEMP_PREFIX, NoSuchKey, TransientStoreError, check_key

log = logging.getLogger(__name__)

# errno values that mean "the path does not name an object".
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
# errno values that may clear up by themselves (someone frees space).
_TRANSIENT = (errno.ENOSPC, errno.EDQUOT)
# os.link is refused by filesystems without hard links.
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def etag_of(data: bytes) -> str:
    """The directory store's ETag of an object: the MD5 of its content, as S3's is for a
    plain PUT (a tag only: equal contents have equal tags, as they do on S3)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LocalStore:
    """An `ObjectStore` in a local directory; safe to share between threads and processes."""

    conditional_writes = True  # put_if_absent by a hard link, put_if_match under a lock

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.url = self.root.as_uri()
        self._warned_no_links = False

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- helpers ---------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    def _error(self, op: str, key: str, exc: OSError) -> StoreError:
        """Turn an unexpected OSError into the user-facing error, transient if it may pass."""
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
            return StoreError(f"Cannot {op} object {key!r} in {self.root}: a file and a "
                              "directory clash on its path; remove the stray entry by hand.")
        cls = TransientStoreError if exc.errno in _TRANSIENT else StoreError
        return cls(f"Cannot {op} object {key!r} in {self.root}: {exc.strerror}; check that "
                   "the directory exists, is writable and has free space.")

    def _makedirs(self, directory: Path) -> None:
        """Create `directory` and any missing parents, fsyncing each new entry's parent."""
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            if d == self.root:
                break
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue
            _fsync_dir(d.parent)

    def _replace(self, path: Path, data: bytes) -> None:
        """Put `data` at `path` whole or not at all: a fsynced temp file renamed over it."""
        tmp = self._write_temp(path.parent, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_temp(self, directory: Path, data: bytes) -> Path:
        """Write `data` to a new fsynced temp file in `directory` and return its path.

        A concurrent delete may prune `directory` between our mkdir and the create; then we
        simply make it again.
        """
        for attempt in range(10):
            self._makedirs(directory)
            tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if attempt == 9:
                    raise
                continue
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            return tmp
        raise AssertionError("unreachable")

    def _prune(self, directory: Path) -> None:
        """Remove `directory` and its parents while they are empty (never the root)."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty, already gone, or busy: all fine
            directory = directory.parent

    # -- ObjectStore -----------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """Return the whole object; raise `NoSuchKey` if it does not exist."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            if exc.errno in _ABSENT:
                raise NoSuchKey(key) from None
            raise self._error("read", key, exc) from exc

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return `length` bytes from `start` (fewer at the end); raise `NoSuchKey`."""
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        path = self._path(key)
        try:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(length)
        except OSError as exc:
            if exc.errno in _ABSENT:
                raise NoSuchKey(key) from None
            raise self._error("read", key, exc) from exc

    def put(self, key: str, data: bytes) -> None:
        """Write the whole object atomically (readers see the old or the new object)."""
        path = self._path(key)
        try:
            self._replace(path, data)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._error("write", key, exc) from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has that key; return False if one exists.

        os.link of a complete temp file is atomic and fails with EEXIST if the name is taken,
        across processes, and readers never see a partial object (O_EXCL on the final name
        would expose one while it is being written). Filesystems without hard links fall back
        to O_EXCL, which is still exclusive.
        """
        path = self._path(key)
        try:
            tmp = self._write_temp(path.parent, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                return self._create_exclusive(key, path, data)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise self._error("create", key, exc) from exc

    def _create_exclusive(self, key: str, path: Path, data: bytes) -> bool:
        if not self._warned_no_links:
            self._warned_no_links = True
            log.warning("%s has no hard links; put_if_absent uses O_EXCL, so a reader may see "
                        "a partly written %r", self.root, key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return True

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """Return the whole object and its ETag; raise `NoSuchKey` if it does not exist."""
        data = self.get(key)
        return data, etag_of(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object only if its ETag is still `etag`; return the new ETag, or None.

        The compare and the rename happen under an exclusive flock(2) on the object's
        directory, which every process's put_if_match takes: atomic against each other
        (the only writers of the objects written this way, the lease and meta/HEAD).
        """
        path = self._path(key)
        try:
            self._makedirs(path.parent)
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = path.read_bytes()
                except OSError as exc:
                    if exc.errno in _ABSENT:
                        return None
                    raise
                if etag_of(current) != etag:
                    return None
                self._replace(path, data)
                os.fsync(fd)
            finally:
                os.close(fd)  # (releases the lock)
        except OSError as exc:
            raise self._error("write", key, exc) from exc
        return etag_of(data)

    def head(self, key: str) -> int | None:
        """Return the object's size, or None if it does not exist."""
        path = self._path(key)
        try:
            st = path.stat()
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise self._error("stat", key, exc) from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        self._delete(key)

    def _delete(self, key: str) -> Path | None:
        """Unlink the object; return its directory if something was removed."""
        path = self._path(key)
        try:
            path.unlink()
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise self._error("delete", key, exc) from exc
        self._prune(path.parent)
        return path.parent

    def delete_many(self, keys: list[str]) -> None:
        """Delete several objects, fsyncing each touched directory once at the end."""
        touched = {d for d in map(self._delete, keys) if d is not None}
        for d in touched:
            # A pruned directory is gone; its parent's entry is best-effort, like rmdir itself.
            with contextlib.suppress(FileNotFoundError):
                _fsync_dir(d)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield (key, size) for every object whose key starts with `prefix`, in key order.

        Key order is code-point order of the whole key, not a per-directory walk: 'a-c' comes
        before 'a/b' because '-' < '/'. Sorting each directory's entries by name, with '/'
        appended to subdirectory names, gives exactly that order while streaming.
        """
        try:
            yield from self._walk(self.root, "", prefix)
        except OSError as exc:
            raise self._error("list", prefix or "/", exc) from exc

    def list_detailed(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Like `list`, with each object's modification time (seconds since the epoch).

        Optional in the protocol: `wsfs gc` needs object ages to leave a mounted writer's
        not-yet-published uploads alone.
        """
        for key, size in self.list(prefix):
            try:
                mtime = self._path(key).stat().st_mtime
            except FileNotFoundError:
                continue
            yield key, size, mtime

    def _walk(self, directory: Path, rel: str, prefix: str) -> Iterator[tuple[str, int]]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return  # pruned while we walked, or the root does not exist yet
        keyed: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            keyed.append((rel + entry.name + ("/" if is_dir else ""), entry, is_dir))
        keyed.sort(key=lambda t: t[0])
        for name, entry, is_dir in keyed:
            if is_dir:
                # Descend only where keys can match: the prefix runs into or past this dir.
                if name.startswith(prefix) or prefix.startswith(name):
                    yield from self._walk(Path(entry.path), name, prefix)
            elif name.startswith(prefix):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield name, st.st_size
