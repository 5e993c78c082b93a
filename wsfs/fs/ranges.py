"""Ranges of a file's block map: lseek(2)'s SEEK_DATA and SEEK_HOLE.

pyfuse3 has no handler for these requests: fs/lowlevel.py hands them to the methods here.

A file's data is where its block map has blocks; a missing block is a hole (it reads as
zeros and is stored nowhere). So SEEK_DATA and SEEK_HOLE answer at block granularity: a block
holding a few bytes is data from its start to its end (or the file's end), as ext4 answers
at its 4 KiB granularity.

Under the writeback cache the kernel holds written pages for seconds before it hands them
over, and it sends FUSE_LSEEK without writing them back first (fs/fuse/file.c): answered
from the block map alone, SEEK_DATA would call a file just written a hole, and `cp` (which
skips holes) would copy zeros. Only a file open for writing can have such pages (close(2)
writes them back, and a shared mapping keeps its file open; coherence.py tracks them), so
for one the answer waits until the kernel has handed over every dirty page of the mount
(`writeback`: syncfs(2)).
"""

from __future__ import annotations

import errno
import os

from pyfuse3 import FUSEError

from .data import DataOps


class RangeOps(DataOps):
    """lseek(2) SEEK_DATA/SEEK_HOLE over the block map."""

    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """Not yet: EOPNOTSUPP, on which glibc's posix_fallocate(3) writes zeros instead."""
        raise FUSEError(errno.EOPNOTSUPP)

    async def lseek(self, inode: int, offset: int, whence: int) -> int:
        """Where the data (SEEK_DATA) or the hole (SEEK_HOLE) at or after `offset` starts;
        ENXIO at or past the end of the file, and for SEEK_DATA in its last hole."""
        ino = int(inode)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FUSEError(errno.EINVAL)
        if self.direct.has_cached_writers(ino) and self.writeback is not None:
            # Not under the inode's lock: the pages handed over arrive as writes, which
            # take it when it is held.
            await self.writeback()
        size = self._node(ino).size
        if offset < 0 or offset >= size:
            raise FUSEError(errno.ENXIO)
        idx = offset // self.bs
        if whence == os.SEEK_HOLE:
            return min(size, max(offset, self.meta.next_hole(ino, idx) * self.bs))
        found = self.meta.next_block(ino, idx)
        if found is None or found * self.bs >= size:
            raise FUSEError(errno.ENXIO)
        return max(offset, found * self.bs)
