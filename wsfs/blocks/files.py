"""Local file helpers of the block layer: whole writes, in-kernel copies, full-disk errors."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3


def disk_full(exc: BaseException) -> bool:
    """Whether a failure means the cache disk is full (OSError or SQLite's own wording)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite(2) all of `data`: a nearly full disk takes part of it and fails the rest."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def copy_all(src: int, dst: int) -> int:
    """Copy all of file `src` to the start of file `dst` inside the kernel; return the length."""
    size = os.fstat(src).st_size
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n == 0:
                break
            done += n
    except OSError as e:  # no in-kernel copy between these files: through user space
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while done < size:
            chunk = os.pread(src, min(size - done, 1 << 20), done)
            if not chunk:
                break
            pwrite_all(dst, chunk, done)
            done += len(chunk)
    return done


def object_key(block_id: str) -> str:
    return f"data/{block_id[:2]}/{block_id}"


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
