"""Room reserved on the cache disk for blocks not written yet (fallocate(2) of a file's holes).

A reservation is a file `reserved/<id>` whose disk space is allocated (fallocate(2) with
FALLOC_FL_KEEP_SIZE: one block of space, a length of 0) and that no metadata names. The first
write into the hole it was made for moves it to `dirty/<id>` (a rename on the same disk), where
it becomes that block's file: the write lands in space the disk already gave, so neither it nor
the later writes filling the block can run out of room. The flusher never sees a reservation
(it is no dirty block), so it lasts until it is used or released: by a truncate or a punched
hole over it, by the file's deletion, or at unmount. None survives the daemon: the next start
deletes the directory's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Reservations:
    """The files under `reserved/` (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        shutil.rmtree(self.dir, ignore_errors=True)  # an earlier run's: nothing names them
        self.dir.mkdir(parents=True, exist_ok=True)
        self.unsupported = False  # the cache disk cannot allocate without writing

    def path(self, reserved_id: str) -> Path:
        return self.dir / reserved_id

    def make(self, count: int, size: int) -> list[str]:
        """`count` reservations of `size` bytes each (blocking); raises ENOSPC, having made
        none, when the disk cannot give them; [] when it cannot allocate space without
        writing it (the caller's room check is then all there is)."""
        made: list[str] = []
        try:
            for _ in range(count):
                reserved_id = secrets.token_hex(16)
                fd = os.open(self.path(reserved_id), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                made.append(reserved_id)
                try:
                    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err), str(self.path(reserved_id)))
                finally:
                    os.close(fd)
        except OSError as e:
            self.release(made)
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if not self.unsupported:
                log.info("the cache disk cannot allocate space ahead (%s): fallocate(2) only "
                         "checks that it has room", e)
                self.unsupported = True
            return []
        return made

    def release(self, reserved_ids: list[str]) -> None:
        for reserved_id in reserved_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(reserved_id))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
