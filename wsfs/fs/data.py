"""File data: open, read, write, truncate and fsync, mapped onto blocks."""

from __future__ import annotations

import errno
import logging
import os
import stat
from functools import partial

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..blocks import BlockCorrupt
from ..meta import BlockRef, Inode
from ..meta.times import now_ns
from ..store import TransientStoreError
from .base import (
    PREFETCH_FILES,
    READAHEAD_BLOCKS,
    WRITE_FLAGS,
    Base,
)

log = logging.getLogger(__name__)

# At most this many row changes since the last sync of the WAL make its sync a small one, a
# few pages, that may run on the trio thread (blocks/fsync.py): an SQLite commit's setattr
# and block map, not a `tar -x` between two fsyncs.
WAL_SMALL_CHANGES = 32


class _WalSync:
    """A sync of the metadata WAL in progress: the change counters it makes durable (everything
    committed when it began), and an event set when it ends, succeeded or not."""

    __slots__ = ("changes", "data_changes", "done")

    def __init__(self, changes: int, data_changes: int) -> None:
        self.changes = changes
        self.data_changes = data_changes
        self.done = trio.Event()


class DataOps(Base):
    """Handlers that move file data between the kernel and the block cache."""

    # Metadata.data_changes at the last completed sync of the WAL (see _synced_changes)
    _synced_data_changes = -1
    # The sync of the WAL running now, if any (the newest): concurrent fsyncs share it
    _wal_sync: _WalSync | None = None

    # -- file data -------------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        ino = int(inode)
        if flags & WRITE_FLAGS:
            self._writable()
            if ino == self.marker_ino:
                raise FUSEError(errno.EPERM)
        self._node(ino)
        if flags & os.O_TRUNC:  # FUSE_ATOMIC_O_TRUNC: the kernel sends no setattr for it
            async with self._lock(ino):
                node = self._node(ino)
                if node.size:
                    node.mtime_ns = node.ctime_ns = now_ns()
                    await self._truncate(node, 0)
        return self._open_handle(ino, flags)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        ino = self._handles.pop(int(fh))
        self.direct.released(int(fh), ino)
        self._read_end.pop(int(fh), None)
        self._ahead_to.pop(int(fh), None)
        self._open[ino] -= 1
        if self._open[ino] <= 0:
            del self._open[ino]
            self._last_closed(ino)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """close(2) has nothing to tell this filesystem: the kernel writes the file's cached
        pages back to it before it would send FLUSH, and once FLUSH is answered ENOSYS it
        sends it no more. One round trip less per close: ~2,400 for extracting a package
        tree, one per module for `import`."""
        raise FUSEError(errno.ENOSYS)

    async def _read_block(self, ino: int, ref: BlockRef, offset: int, size: int) -> bytes:
        """Read part of a block, turning store and checksum failures into EIO.

        A block can move while its download waits: the repacker copies it to a new pack and
        the old one is deleted, or a writer replaces it. So a block that went missing is
        looked up once more, and read from where it is now (or as it is now), before the
        failure counts. One that is gone from the file (a truncate ran while a read waited
        for an earlier block) reads as the hole it is now.
        """
        try:
            return await self.blocks.read(ref.id, ref.csum, ref.pack, offset, size)
        except BlockCorrupt as e:
            now = self._block_now(ino, ref)
            if now is None:  # dropped meanwhile: the hole the file has there now
                return b""
            if now != ref:
                log.info("block %s moved while it was read; reading it again", ref.id)
                return await self._read_block(ino, now, offset, size)
            log.error("%s", e)
            raise FUSEError(errno.EIO) from None
        except TransientStoreError as e:
            log.error("cannot download block %s: %s", ref.id, e)
            raise FUSEError(errno.EIO) from None

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        ino = self._handles[int(fh)]
        direct = self.direct
        while True:
            token = direct.read_began(ino)
            data = await self._read_range(int(fh), ino, off, size)
            if not direct.read_is_stale(ino, token):  # (fs/coherence.py, rule 2)
                break
        direct.read_answered(ino)
        return data

    async def _read_range(self, fh: int, ino: int, off: int, size: int) -> bytes:
        meta = self._meta_for(ino)
        node = meta.get_inode(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        end = min(off + size, node.size)
        if off >= end:
            return b""
        first, last = off // self.bs, (end - 1) // self.bs
        refs = meta.blocks_in(ino, first, last)
        misses = self.blocks.misses
        parts = []
        for idx in range(first, last + 1):
            start = max(off, idx * self.bs)
            stop = min(end, (idx + 1) * self.bs)
            ref = refs.get(idx)
            data = b""
            if ref is not None:
                data = await self._read_block(ino, ref, start - idx * self.bs, stop - start)
            parts.append(data.ljust(stop - start, b"\0"))
        if self._read_end.get(fh) == off:
            self._readahead(fh, ino, last + 1)
        elif self.blocks.misses != misses and node.size <= self.bs:
            self._prefetch_siblings(ino)
        self._read_end[fh] = end
        return b"".join(parts)

    def _readahead(self, fh: int, ino: int, first: int) -> None:
        """Ask for the blocks after a sequential read, each once per handle: the kernel reads
        128 KiB at a time, and asking for the whole window on every read cost the FUSE
        thread a query per block of it (a fifth of its time on a cold sequential read)."""
        stop = first + READAHEAD_BLOCKS
        start = max(first, self._ahead_to.get(fh, 0))
        if self.nursery is None or start >= stop:
            return
        self._ahead_to[fh] = stop
        for ref in self._meta_for(ino).blocks_in(ino, start, stop - 1).values():
            self.blocks.prefetch(self.nursery, ref.id, ref.csum, ref.pack)

    def _prefetch_siblings(self, ino: int) -> None:
        """A small file missed the cache: fetch the other small files of its directory too.

        On an empty cache, `import` or `git status` read many small files of a directory
        one after another, each waiting for its own download; fetching them together turns
        that chain of round trips into one wave. Once per directory and mount, bounded.
        """
        parent = self.meta.parent_of(ino)
        if self.nursery is None or parent is None or parent in self._prefetched_dirs:
            return
        self._prefetched_dirs.add(parent)
        for ref in self.meta.small_file_blocks(parent, self.bs, PREFETCH_FILES):
            self.blocks.prefetch(self.nursery, ref.id, ref.csum, ref.pack)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        ino = self._handles[int(fh)]
        self._writable(ino)
        await self.blocks.wait_for_room(len(buf), partial(self._in_reserved_room, ino, off,
                                                          len(buf)))
        lock = self._lock(ino)
        if lock.locked() or not self._write_in_place(ino, off, buf):
            async with lock:
                pos = 0
                while pos < len(buf):
                    idx, in_off = divmod(off + pos, self.bs)
                    piece = buf[pos : pos + self.bs - in_off]
                    await self._write_block(ino, idx, in_off, piece)
                    pos += len(piece)
                self._written(ino, off + len(buf))
        if self.direct.is_direct(int(fh)):  # past the kernel's page cache: see coherence.py
            await self.direct.applied(ino, self.nursery)
        return len(buf)

    def _write_in_place(self, ino: int, off: int, buf: bytes) -> bool:
        """The common case without the inode's lock: every block `buf` covers is writable or
        a hole, so the write needs no await (no copy, no download) and is atomic as it is.
        Holes get new blocks here: a new file's first write costs one lookup, not two.
        Returns False, having written nothing, when it is not that case."""
        bs = self.bs
        first, last = off // bs, (off + len(buf) - 1) // bs
        refs = self.meta.blocks_in(ino, first, last)
        blocks = self.blocks
        if not all(blocks.is_writable(r.id) for r in refs.values()):
            return False
        new: dict[int, str] = {}
        try:
            for idx in range(first, last + 1):  # the new blocks first: undone on failure
                if idx not in refs:
                    start = max(off, idx * bs)
                    new[idx] = self._new_block(ino, idx)
                    blocks.write(new[idx], start - idx * bs,
                                 buf[start - off : min(off + len(buf), (idx + 1) * bs) - off])
            if len(new) == 1:  # one statement: atomic without a savepoint
                (idx, block_id), = new.items()
                self.meta.set_block(ino, idx, block_id)
            elif new:
                with self._txn():
                    for idx, block_id in new.items():
                        self.meta.set_block(ino, idx, block_id)
        except BaseException:  # a full disk: the new blocks must not linger unreferenced
            for block_id in new.values():
                blocks.discard(block_id)
            raise
        for idx, ref in refs.items():
            start = max(off, idx * bs)
            blocks.write(ref.id, start - idx * bs,
                         buf[start - off : min(off + len(buf), (idx + 1) * bs) - off])
        self._written(ino, off + len(buf))
        return True

    def _new_block(self, ino: int, idx: int) -> str:
        """A new writable block for block `idx` of `ino`: from the room reserved for it, if
        fallocate(2) reserved some (fs/ranges.py)."""
        held = self._reserved.get(ino)
        reserved_id = held.pop(idx, None) if held else None
        if reserved_id is not None:
            if not held:
                del self._reserved[ino]
            try:
                return self.blocks.adopt(reserved_id)
            except OSError as e:
                log.warning("cannot use the room reserved for block %d of inode %d: %s",
                            idx, ino, e)
        return self.blocks.create()

    def _in_reserved_room(self, ino: int, off: int, size: int) -> bool:
        """Whether a write lands in room fallocate(2) reserved only: a hole with a
        reservation, or a block made from one and writable still. Such a write needs no
        room on a full cache disk (the room is taken already)."""
        bs = self.bs
        first, last = off // bs, (off + max(size, 1) - 1) // bs
        held = self._reserved.get(ino, {})
        refs = self.meta.blocks_in(ino, first, last)
        return all(idx in held if idx not in refs else self.blocks.is_preallocated(refs[idx].id)
                   for idx in range(first, last + 1))

    def _written(self, ino: int, end: int) -> None:
        """After a write that ends at `end`: the file's new size (and times without the
        writeback cache)."""
        node = self._node(ino)
        if end > node.size or not self.enable_writeback_cache:
            node.size = max(node.size, end)
            if not self.enable_writeback_cache:
                # With the writeback cache the kernel stamps mtime/ctime at write(2) time
                # and sends them through setattr; a write arriving here (seconds later)
                # must not overwrite them with the time of its writeback.
                node.mtime_ns = node.ctime_ns = now_ns()
            self.meta.save_inode(node)

    async def _write_block(self, ino: int, idx: int, in_off: int, piece: bytes) -> None:
        ref = self.meta.get_block(ino, idx)
        if ref is not None and self.blocks.is_writable(ref.id):
            self.blocks.write(ref.id, in_off, piece)
            return
        # Copy on write: uploaded and sealed blocks are immutable.
        new_id = None
        if ref is not None and not (in_off == 0 and len(piece) == self.bs):
            new_id = await self.blocks.copy(ref.id)  # from the local copy, if there is one
            if new_id is None:
                new_id = await self.blocks.create_synced(
                    await self._read_block(ino, ref, 0, self.bs))
        if new_id is None:
            new_id = self._new_block(ino, idx)
        try:
            self.blocks.write(new_id, in_off, piece)
        except BaseException:  # a full disk: the new block must not linger unreferenced
            self.blocks.discard(new_id)
            raise
        with self._txn():
            self.meta.set_block(ino, idx, new_id)
            if ref is not None:
                self._drop_blocks([ref])

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        ino = self._handles[int(fh)]
        await self._fsync_inode(ino, datasync)

    async def _fsync_inode(self, ino: int, datasync: bool = False) -> None:
        """Make the file's dirty blocks and all metadata durable on the disk: with
        `datasync` (fdatasync(2)), all but changes that only moved timestamps.

        The blocks and the metadata WAL are synced in parallel: one round of disk flushes. No
        order between them is lost by that: the kernel writes the WAL back on its own schedule
        anyway (it is committed every COMMIT_INTERVAL without a sync), so durable metadata
        never implied durable blocks before this fsync(2) returns, and after it both are.
        The WAL is synced only if it holds changes this call needs that no finished sync
        covered, and not again when a running sync covers them (group commit).

        Blocks with a checksum are left out: the store holds them, and the checksum that
        says so is durable once this call returns (a statement before this call, so in the
        WAL this call syncs or waits for), so a crash reads them from the store.
        """
        node = self._node(ino)
        ids = self.meta.blocks_to_upload(ino) if stat.S_ISREG(node.mode) else []
        changes, data_changes = self.meta.total_changes, self.meta.data_changes

        def wal_needed() -> bool:  # else a finished sync of the WAL covered all this call needs
            return (data_changes > self._synced_data_changes if datasync
                    else changes > self._synced_changes)

        running = self._wal_sync
        if wal_needed() and running is not None and (
                running.data_changes >= data_changes if datasync
                else running.changes >= changes):
            # Group commit: a sync of the WAL that began after every change this call needs
            # was committed is running; its end makes them durable too (concurrent fsyncs).
            await self.blocks.fsync(ids, metadata=self)
            ids = []
            await running.done.wait()
        if wal_needed():  # (again, if the running sync failed)
            self.meta.flush()
            mine = self._wal_sync = _WalSync(changes, data_changes)
            try:
                await self.blocks.fsync(
                    ids, also=self.meta.sync, metadata=self,
                    also_small=changes - self._synced_changes <= WAL_SMALL_CHANGES)
                self._synced_changes = max(self._synced_changes, changes)
                self._synced_data_changes = max(self._synced_data_changes, data_changes)
            finally:
                if self._wal_sync is mine:
                    self._wal_sync = None
                mine.done.set()
        elif ids:
            await self.blocks.fsync(ids, metadata=self)
        if self.remote_fsync is not None:
            await self.remote_fsync()

    async def _truncate(self, node: Inode, size: int) -> None:
        """Cut or extend a file to `size` bytes; the bytes past the old end read as zeros.

        A cut block is copied, never cut in place: until the new size is committed, the old
        metadata must still find the old bytes (a crash in between comes back to them). Its
        copy ends at its last non-zero byte (a short block reads as if padded with zeros),
        and a cut block left with zeros only becomes a hole: SEEK_HOLE sees it as ext4 does.
        """
        if size < node.size:
            first_gone = (size + self.bs - 1) // self.bs
            tail = size % self.bs
            tail_ref = self.meta.get_block(node.id, size // self.bs) if tail else None
            content = b""
            if tail_ref is not None:
                content = (await self._read_block(node.id, tail_ref, 0, tail)).rstrip(b"\0")
                # as it is now (see RangeOps._zero_in_block)
                tail_ref = self.meta.get_block(node.id, size // self.bs) or tail_ref
            new_id = await self.blocks.create_synced(content) if content else None
            try:
                with self._txn():
                    self._drop_blocks(self.meta.remove_blocks_from(node.id, first_gone))
                    if tail_ref is not None:
                        if new_id is None:
                            self.meta.remove_block(node.id, size // self.bs)
                        else:
                            self.meta.set_block(node.id, size // self.bs, new_id)
                        self._drop_blocks([tail_ref])
                    node.size = size
                    self.meta.save_inode(node)
            except BaseException:  # the copy must not linger unreferenced
                if new_id is not None:
                    self.blocks.discard(new_id)
                raise
            self._unreserve(node.id, first_gone)
        else:
            node.size = size
            with self._txn():
                self.meta.save_inode(node)
