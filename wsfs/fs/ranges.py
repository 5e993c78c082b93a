"""Ranges of a file's block map: fallocate(2), and lseek(2)'s SEEK_DATA and SEEK_HOLE.

pyfuse3 has no handler for these requests: fs/lowlevel.py hands them to the methods here.

fallocate's modes, as far as the kernel's FUSE client passes them on (it refuses
COLLAPSE_RANGE and INSERT_RANGE itself, with EOPNOTSUPP):

- PUNCH_HOLE (with KEEP_SIZE, which the VFS requires): the blocks the range covers whole
  leave the block map, which frees them (a dirty block's file goes, an uploaded one becomes
  garbage); a block it covers in part is zeroed there, and leaves the map too if that left
  it all zeros. The kernel has written back the range and drops its cached pages after.
- ZERO_RANGE: the same zeroing, then the range is allocated as below (ext4 keeps the range
  allocated, as unwritten extents).
- mode 0 (and KEEP_SIZE, which keeps the size): the range's holes stay holes in the map
  (they read as zeros, as ext4's unwritten extents do, and SEEK_DATA skips both), and the
  cache disk reserves their room (blocks/reserved.py), used by the first write into each
  and skipped by the room check of writes landing there: ENOSPC at once when the disk never
  could hold them, even with no clean copy cached and every dirty block uploaded; else
  clean copies are evicted, and uploads awaited, as for a writer. Blocks already in the
  range are left as they are. The room goes back when the hole is punched, truncated away
  or deleted with its file, and at the unmount.

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
import stat

from pyfuse3 import FUSEError

from ..meta import Inode
from ..meta.times import now_ns
from .data import DataOps

# fallocate(2)'s modes (linux/falloc.h)
KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10


class RangeOps(DataOps):
    """fallocate(2), and lseek(2) SEEK_DATA/SEEK_HOLE, over the block map."""

    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        ino = int(inode)
        self._writable(ino)
        if ino == self.marker_ino:
            raise FUSEError(errno.EPERM)
        if mode & ~(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE) or (
                mode & PUNCH_HOLE and mode != PUNCH_HOLE | KEEP_SIZE):
            raise FUSEError(errno.EOPNOTSUPP)  # (the kernel refuses these before us)
        if offset < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        end = offset + length
        async with self._lock(ino):
            node = self._node(ino)
            if not stat.S_ISREG(node.mode):
                raise FUSEError(errno.ENODEV)
            if mode & (PUNCH_HOLE | ZERO_RANGE):
                await self._zero(node, offset, min(end, node.size))
            if mode & PUNCH_HOLE:  # the room reserved for the blocks it covers goes too
                self._unreserve(ino, (offset + self.bs - 1) // self.bs, end // self.bs - 1)
            else:
                await self._allocate(node, offset, end)
            changed = not mode & KEEP_SIZE and end > node.size
            if changed:
                node.size = end
            if not self.enable_writeback_cache:  # (else the kernel stamps them: `_written`)
                node.mtime_ns = node.ctime_ns = now_ns()
                changed = True
            if changed:
                self.meta.save_inode(node)

    async def _zero(self, node: Inode, start: int, stop: int) -> None:
        """Zero bytes [start, stop) of the file (within its size): drop the blocks the range
        covers whole, zero the others in part."""
        if start >= stop:
            return
        bs, ino = self.bs, node.id
        first, last = start // bs, (stop - 1) // bs
        whole = [i for i in range(first, last + 1)
                 if start <= i * bs and min((i + 1) * bs, node.size) <= stop]
        for idx in sorted({first, last} - set(whole)):
            lo, hi = max(start, idx * bs) - idx * bs, min(stop, (idx + 1) * bs) - idx * bs
            await self._zero_in_block(ino, idx, lo, hi)
        if whole:
            with self._txn():
                self._drop_blocks(self.meta.remove_blocks_in(ino, whole[0], whole[-1]))

    async def _zero_in_block(self, ino: int, idx: int, lo: int, hi: int) -> None:
        """Zero bytes [lo, hi) of block `idx`; a block left all zeros leaves the map."""
        ref = self.meta.get_block(ino, idx)
        if ref is None:
            return  # a hole reads as zeros already
        content = await self._read_block(ino, ref, 0, self.bs)
        # As it is now: an upload or a repack may have given it a checksum or another pack
        # meanwhile (the same bytes: writers wait for the inode's lock), and dropping it
        # must name the objects that hold it now.
        ref = self.meta.get_block(ino, idx) or ref
        zeroed = (content[:lo] + bytes(max(0, min(hi, len(content)) - lo))
                  + content[hi:]).rstrip(b"\0")
        if not zeroed:
            with self._txn():
                self.meta.remove_block(ino, idx)
                self._drop_blocks([ref])
        elif self.blocks.is_writable(ref.id):
            if lo < len(content):
                self.blocks.write(ref.id, lo, bytes(min(hi, len(content)) - lo))
        else:  # copy on write, as a cut tail block is copied (DataOps._truncate)
            await self.blocks.wait_for_room(len(zeroed))
            new_id = await self.blocks.create_synced(zeroed)
            try:
                with self._txn():
                    self.meta.set_block(ino, idx, new_id)
                    self._drop_blocks([ref])
            except BaseException:  # the copy must not linger unreferenced
                self.blocks.discard(new_id)
                raise

    async def _allocate(self, node: Inode, start: int, stop: int) -> None:
        """Reserve room on the cache disk for the holes of [start, stop) (see the module
        docstring); ENOSPC when the disk cannot hold them."""
        bs, ino = self.bs, node.id
        first, last = start // bs, (stop - 1) // bs
        refs = self.meta.blocks_in(ino, first, last)
        held = self._reserved.get(ino, {})
        holes = [i for i in range(first, last + 1) if i not in refs and i not in held]
        if not holes:
            return
        made = await self.blocks.reserve_room(len(holes))
        if self.meta.get_inode(ino) is None:  # deleted meanwhile (reap takes no lock)
            self.blocks.release_room(made)
            raise FUSEError(errno.ENOENT)
        self._reserved.setdefault(ino, {}).update(zip(holes, made, strict=False))

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
        meta = self._meta_for(ino)
        node = meta.get_inode(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        size = node.size
        if offset < 0 or offset >= size:
            raise FUSEError(errno.ENXIO)
        idx = offset // self.bs
        if whence == os.SEEK_HOLE:
            return min(size, max(offset, meta.next_hole(ino, idx) * self.bs))
        found = meta.next_block(ino, idx)
        if found is None or found * self.bs >= size:
            raise FUSEError(errno.ENXIO)
        return max(offset, found * self.bs)
