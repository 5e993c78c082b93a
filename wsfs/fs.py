"""POSIX semantics: the pyfuse3 request handlers, and the workspace marker policy.

Every handler runs in the one trio thread. Metadata statements run synchronously between
awaits, so a handler that does not await is atomic; one that does (a read or a write that must
download a block) takes the inode's lock first, so that two writers of one file never race on
its block map. The kernel does the permission checks (`default_permissions`) and, with the
writeback cache, owns mtime and size while a file is being written: it sends them back to us
through setattr.

File offsets become blocks here: block `idx` of a file covers bytes [idx*bs, (idx+1)*bs). The
block layer never learns which file a block belongs to.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import sqlite3
import stat
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .blocks import BlockCache, BlockCorrupt
from .meta import Inode, Metadata
from .store import TransientStoreError

log = logging.getLogger(__name__)

ROOT = int(pyfuse3.ROOT_INODE)
MARKER = b".workspace.initialized"
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
READAHEAD_BLOCKS = 4
PREFETCH_FILES = 64  # small files of a directory fetched together after a cache miss
STATFS_CACHE_SECONDS = 5.0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def now_ns() -> int:
    return time.time_ns()


class Operations(pyfuse3.Operations):
    """The filesystem as the kernel sees it."""

    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(
        self,
        meta: Metadata,
        blocks: BlockCache,
        *,
        cache_timeout: float = 300.0,
        read_only: bool = False,
        remote_fsync: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.meta = meta
        self.blocks = blocks
        self.bs = blocks.block_size
        self.timeout = cache_timeout
        self.read_only = read_only
        self.remote_fsync = remote_fsync
        self.nursery: trio.Nursery | None = None  # for readahead; set by the mount
        self._lookups: dict[int, int] = defaultdict(int)
        self._open: dict[int, int] = defaultdict(int)  # inode -> open file handles
        self._handles: dict[int, int] = {}  # fh -> inode
        self._read_end: dict[int, int] = {}  # fh -> where the last read ended (readahead)
        self._next_fh = 1
        self._prefetched_dirs: set[int] = set()
        self._synced_changes = -1  # metadata changes counted at the last completed fsync
        self._statfs_at = -STATFS_CACHE_SECONDS
        self._statfs_counts = (0, 0, 0)
        self._locks: dict[int, trio.Lock] = {}
        self.marker_ino = meta.lookup(ROOT, MARKER)

    # -- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _txn(self) -> Iterator[None]:
        """Group a handler's statements so a crash never leaves half of them."""
        self.meta.begin()
        try:
            yield
        except BaseException:
            self.meta.rollback()
            raise
        self.meta.commit()

    def _node(self, ino: int) -> Inode:
        node = self.meta.get_inode(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Inode, nblocks: int | None = None) -> pyfuse3.EntryAttributes:
        """The attributes the kernel caches for `timeout` seconds (we are the only writer).

        `nblocks` is the number of stored blocks of a regular file, if the caller has it.
        """
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.id)
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = pyfuse3.ModeT(node.mode)
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = 128 * 1024
        if stat.S_ISREG(node.mode) and node.size:
            if nblocks is None:
                nblocks = self.meta.block_count(node.id)
            a.st_blocks = (min(node.size, nblocks * self.bs) + 511) // 512
        else:
            a.st_blocks = 0
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a new reference to the inode."""
        self._lookups[node.id] += 1
        return self._attr(node)

    def _writable(self) -> None:
        if self.read_only:
            raise FUSEError(errno.EROFS)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)

    def _is_marker(self, parent: int, name: bytes) -> bool:
        return parent == ROOT and name == MARKER

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    def _touch_dir(self, node: Inode, ts: int) -> None:
        node.mtime_ns = node.ctime_ns = ts
        self.meta.save_inode(node)

    def _drop_blocks(self, refs: Sequence[str]) -> None:
        """Release blocks the metadata stopped referencing (in the caller's transaction)."""
        garbage = [b for b in refs if self.blocks.discard(b)]
        if garbage:
            self.meta.add_garbage(garbage)

    def _maybe_delete(self, ino: int) -> None:
        """Delete an inode once no entry names it, no handle holds it and the kernel forgot it."""
        if self._lookups.get(ino) or self._open.get(ino):
            return
        node = self.meta.get_inode(ino)
        if node is not None and node.nlink == 0:
            with self._txn():
                self._drop_blocks(self.meta.delete_inode(ino))
            self._statfs_at = -STATFS_CACHE_SECONDS  # the inode count changed
            self._locks.pop(ino, None)

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = int(parent_inode)
        self._check_name(name)
        if name == b"." or name == b"..":
            found = self.meta.get_inode_blocks(parent if name == b"." else self._parent_dir(parent))
        else:
            found = self.meta.lookup_inode(parent, name)
        if found is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = pyfuse3.InodeT(0)
            neg.entry_timeout = self.timeout  # the kernel caches the miss; we are the only writer
            return neg
        self._lookups[found[0].id] += 1
        return self._attr(*found)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(int(ino), 0) - n
            if left > 0:
                self._lookups[int(ino)] = left
            else:
                self._lookups.pop(int(ino), None)
                try:
                    self._maybe_delete(int(ino))
                except Exception:  # forget must not raise
                    log.exception("could not delete inode %d", ino)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        found = self.meta.get_inode_blocks(int(inode))
        if found is None:
            raise FUSEError(errno.ENOENT)
        return self._attr(*found)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ino = int(inode)
        self._writable()
        ts = now_ns()
        async with self._lock(ino):
            node = self._node(ino)
            if ino == self.marker_ino and not self._is_time_flush(node, attr, fields):
                raise FUSEError(errno.EPERM)
            if fields.update_size:
                if stat.S_ISDIR(node.mode):
                    raise FUSEError(errno.EISDIR)
                await self._truncate(node, attr.st_size)
                node.mtime_ns = node.ctime_ns = ts
            if fields.update_mode:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                node.uid = attr.st_uid
            if fields.update_gid:
                node.gid = attr.st_gid
            if fields.update_atime:
                node.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
            node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else ts
            with self._txn():
                self.meta.save_inode(node)
        return self._attr(node)

    @staticmethod
    def _is_time_flush(
        node: Inode, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> bool:
        """Whether a setattr only hands back the kernel's ctime (and an unchanged mtime).

        Under the writeback cache the kernel stamps ctime itself (a link to or from the
        marker, say) and flushes it with a setattr at close; refusing that one would turn
        the reader's close(2) into EIO. Anything that changes content, mode, owner, atime
        or mtime of the marker is still refused.
        """
        return not (
            fields.update_size or fields.update_mode or fields.update_uid
            or fields.update_gid or fields.update_atime
            or (fields.update_mtime and attr.st_mtime_ns != node.mtime_ns)
        )

    async def _truncate(self, node: Inode, size: int) -> None:
        """Cut or extend a file to `size` bytes; the bytes past the old end read as zeros.

        A cut block is copied, never cut in place: until the new size is committed, the old
        metadata must still find the old bytes (a crash in between comes back to them).
        """
        if size < node.size:
            first_gone = (size + self.bs - 1) // self.bs
            tail = size % self.bs
            tail_ref = self.meta.get_block(node.id, size // self.bs) if tail else None
            content = b""
            if tail_ref is not None:
                content = await self._read_block(tail_ref.id, tail_ref.csum, 0, tail)
            with self._txn():
                self._drop_blocks([r.id for r in self.meta.remove_blocks_from(node.id, first_gone)])
                if tail_ref is not None:
                    new_id = self.blocks.create(content)
                    self.meta.set_block(node.id, size // self.bs, new_id, None)
                    self._drop_blocks([tail_ref.id])
                node.size = size
                self.meta.save_inode(node)
        else:
            node.size = size
            with self._txn():
                self.meta.save_inode(node)

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(int(inode))
        if node.target is None:
            raise FUSEError(errno.EINVAL)
        return node.target

    # -- creating and removing names -------------------------------------------------------

    def _new_node(
        self,
        parent: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        self._writable()
        self._check_name(name)
        dir_node = self._node(parent)
        if dir_node.nlink == 0:
            raise FUSEError(errno.ENOENT)
        if self.meta.lookup(parent, name) is not None:
            raise FUSEError(errno.EEXIST)
        gid = ctx.gid
        if dir_node.mode & stat.S_ISGID:  # BSD group semantics for setgid directories
            gid = dir_node.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        is_dir = stat.S_ISDIR(mode)
        ts = now_ns()
        with self._txn():
            self._statfs_at = -STATFS_CACHE_SECONDS  # the inode count changes
            node = self.meta.create_inode(
                mode, ctx.uid, gid, ts, nlink=2 if is_dir else 1, rdev=rdev,
                size=len(target) if target is not None else 0, target=target,
            )
            self.meta.add_entry(parent, name, node.id)
            if is_dir:
                dir_node.nlink += 1
            self._touch_dir(dir_node, ts)
        return node

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._new_node(int(parent_inode), name, mode, ctx, rdev=rdev))

    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        mode = pyfuse3.ModeT(stat.S_IFDIR | stat.S_IMODE(mode))
        return self._entry(self._new_node(int(parent_inode), name, mode, ctx))

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFLNK | 0o777
        return self._entry(self._new_node(int(parent_inode), name, mode, ctx, target=target))

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new_node(int(parent_inode), name, mode, ctx)
        return self._open_handle(node.id), self._entry(node)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        self._check_name(new_name)
        parent = int(new_parent_inode)
        node = self._node(int(inode))
        dir_node = self._node(parent)
        if self.meta.lookup(parent, new_name) is not None:
            raise FUSEError(errno.EEXIST)
        ts = now_ns()
        with self._txn():
            node.nlink += 1
            node.ctime_ns = ts
            self.meta.save_inode(node)
            self.meta.add_entry(parent, new_name, node.id)
            self._touch_dir(dir_node, ts)
        return self._entry(node)

    def _unlink_node(self, node: Inode, ts: int) -> None:
        """Count one name less (a directory loses its own "." too); the caller commits."""
        if stat.S_ISDIR(node.mode):
            node.nlink = 0
        else:
            node.nlink -= 1
        node.ctime_ns = ts
        self.meta.save_inode(node)

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = int(parent_inode)
        self._writable()
        if self._is_marker(parent, name):
            raise FUSEError(errno.EPERM)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self._node(ino)
        if stat.S_ISDIR(node.mode):
            raise FUSEError(errno.EISDIR)
        ts = now_ns()
        with self._txn():
            self.meta.remove_entry(parent, name)
            self._unlink_node(node, ts)
            self._touch_dir(self._node(parent), ts)
        self._maybe_delete(ino)

    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = int(parent_inode)
        self._writable()
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self._node(ino)
        if not stat.S_ISDIR(node.mode):
            raise FUSEError(errno.ENOTDIR)
        if self.meta.has_entries(ino):
            raise FUSEError(errno.ENOTEMPTY)
        ts = now_ns()
        with self._txn():
            self.meta.remove_entry(parent, name)
            self._unlink_node(node, ts)
            dir_node = self._node(parent)
            dir_node.nlink -= 1
            self._touch_dir(dir_node, ts)
        self._maybe_delete(ino)

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent, new_parent = int(parent_inode_old), int(parent_inode_new)
        self._writable()
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise FUSEError(errno.EINVAL)  # RENAME_WHITEOUT: overlayfs only
        self._check_name(name_new)
        if self._is_marker(old_parent, name_old) or self._is_marker(new_parent, name_new):
            raise FUSEError(errno.EPERM)
        src_ino = self.meta.lookup(old_parent, name_old)
        if src_ino is None:
            raise FUSEError(errno.ENOENT)
        dst_ino = self.meta.lookup(new_parent, name_new)
        src = self._node(src_ino)
        ts = now_ns()
        if flags & pyfuse3.RENAME_EXCHANGE:
            if dst_ino is None:
                raise FUSEError(errno.ENOENT)
            other = self._node(dst_ino)
            with self._txn():
                self.meta.retarget_entry(old_parent, name_old, dst_ino)
                self.meta.retarget_entry(new_parent, name_new, src_ino)
                if old_parent != new_parent and stat.S_ISDIR(src.mode) != stat.S_ISDIR(other.mode):
                    moved_dir = 1 if stat.S_ISDIR(src.mode) else -1
                    self._adjust_nlink(old_parent, -moved_dir, ts)
                    self._adjust_nlink(new_parent, moved_dir, ts)
                for n in (src, other):
                    n.ctime_ns = ts
                    self.meta.save_inode(n)
                self._touch_parents(old_parent, new_parent, ts)
            return
        if dst_ino is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EEXIST)
        if dst_ino == src_ino:
            return  # two names of one file: POSIX says do nothing
        src_is_dir = stat.S_ISDIR(src.mode)
        dst = None
        if dst_ino is not None:
            dst = self._node(dst_ino)
            if stat.S_ISDIR(dst.mode):
                if not src_is_dir:
                    raise FUSEError(errno.EISDIR)
                if self.meta.has_entries(dst_ino):
                    raise FUSEError(errno.ENOTEMPTY)
            elif src_is_dir:
                raise FUSEError(errno.ENOTDIR)
        with self._txn():
            if dst is not None:
                self.meta.remove_entry(new_parent, name_new)
                self._unlink_node(dst, ts)
                if stat.S_ISDIR(dst.mode):
                    self._adjust_nlink(new_parent, -1, ts)
            self.meta.move_entry(old_parent, name_old, new_parent, name_new)
            if src_is_dir and old_parent != new_parent:
                self._adjust_nlink(old_parent, -1, ts)
                self._adjust_nlink(new_parent, 1, ts)
            src.ctime_ns = ts
            self.meta.save_inode(src)
            self._touch_parents(old_parent, new_parent, ts)
        if dst_ino is not None:
            self._maybe_delete(dst_ino)

    def _adjust_nlink(self, ino: int, delta: int, ts: int) -> None:
        node = self._node(ino)
        node.nlink += delta
        self._touch_dir(node, ts)

    def _touch_parents(self, a: int, b: int, ts: int) -> None:
        for ino in {a, b}:
            self._touch_dir(self._node(ino), ts)

    # -- file data -------------------------------------------------------------------------

    def _open_handle(self, ino: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        self._open[ino] += 1
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

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
        return self._open_handle(ino)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        ino = self._handles.pop(int(fh))
        self._read_end.pop(int(fh), None)
        self._open[ino] -= 1
        if self._open[ino] <= 0:
            del self._open[ino]
            self._maybe_delete(ino)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def _read_block(self, block_id: str, csum: str | None, offset: int, size: int) -> bytes:
        """Read part of a block, turning store and checksum failures into EIO."""
        try:
            return await self.blocks.read(block_id, csum, offset, size)
        except BlockCorrupt as e:
            log.error("%s", e)
            raise FUSEError(errno.EIO) from None
        except TransientStoreError as e:
            log.error("cannot download block %s: %s", block_id, e)
            raise FUSEError(errno.EIO) from None

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        ino = self._handles[int(fh)]
        node = self._node(ino)
        end = min(off + size, node.size)
        if off >= end:
            return b""
        first, last = off // self.bs, (end - 1) // self.bs
        refs = self.meta.blocks_in(ino, first, last)
        misses = self.blocks.misses
        parts = []
        for idx in range(first, last + 1):
            start = max(off, idx * self.bs)
            stop = min(end, (idx + 1) * self.bs)
            ref = refs.get(idx)
            data = b""
            if ref is not None:
                data = await self._read_block(ref.id, ref.csum, start - idx * self.bs,
                                              stop - start)
            parts.append(data.ljust(stop - start, b"\0"))
        if self._read_end.get(int(fh)) == off:
            self._readahead(ino, last + 1)
        elif self.blocks.misses != misses and node.size <= self.bs:
            self._prefetch_siblings(ino)
        self._read_end[int(fh)] = end
        return b"".join(parts)

    def _readahead(self, ino: int, first: int) -> None:
        if self.nursery is None:
            return
        for ref in self.meta.blocks_in(ino, first, first + READAHEAD_BLOCKS - 1).values():
            self.blocks.prefetch(self.nursery, ref.id, ref.csum)

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
        for block_id, csum in self.meta.small_file_blocks(parent, self.bs, PREFETCH_FILES):
            self.blocks.prefetch(self.nursery, block_id, csum)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        ino = self._handles[int(fh)]
        self._writable()
        await self.blocks.wait_for_room(len(buf))
        async with self._lock(ino):
            pos = 0
            while pos < len(buf):
                idx, in_off = divmod(off + pos, self.bs)
                piece = buf[pos : pos + self.bs - in_off]
                await self._write_block(ino, idx, in_off, piece)
                pos += len(piece)
            node = self._node(ino)
            if off + len(buf) > node.size or not self.enable_writeback_cache:
                node.size = max(node.size, off + len(buf))
                if not self.enable_writeback_cache:
                    # With the writeback cache the kernel stamps mtime/ctime at write(2) time
                    # and sends them through setattr; a write arriving here (seconds later)
                    # must not overwrite them with the time of its writeback.
                    node.mtime_ns = node.ctime_ns = now_ns()
                self.meta.save_inode(node)
        return len(buf)

    async def _write_block(self, ino: int, idx: int, in_off: int, piece: bytes) -> None:
        ref = self.meta.get_block(ino, idx)
        if ref is not None and self.blocks.is_writable(ref.id):
            self.blocks.write(ref.id, in_off, piece)
            return
        # Copy on write: uploaded and sealed blocks are immutable.
        content = b""
        if ref is not None and not (in_off == 0 and len(piece) == self.bs):
            content = await self._read_block(ref.id, ref.csum, 0, self.bs)
        new_id = self.blocks.create(content)
        try:
            self.blocks.write(new_id, in_off, piece)
        except BaseException:  # a full disk: the new block must not linger unreferenced
            self.blocks.discard(new_id)
            raise
        with self._txn():
            self.meta.set_block(ino, idx, new_id, None)
            if ref is not None:
                self._drop_blocks([ref.id])

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        ino = self._handles[int(fh)]
        await self._fsync_inode(ino)

    async def _fsync_inode(self, ino: int) -> None:
        node = self._node(ino)
        if stat.S_ISREG(node.mode) and node.size:
            refs = self.meta.blocks_in(ino, 0, (node.size - 1) // self.bs)
            await self.blocks.fsync([r.id for r in refs.values()])
        changes = self.meta.total_changes
        if changes != self._synced_changes:  # else the last fsync covered everything
            self.meta.flush()
            await trio.to_thread.run_sync(self.meta.sync)
            self._synced_changes = changes
        if self.remote_fsync is not None:
            await self.remote_fsync()

    # -- directories -----------------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self._node(int(inode))
        if not stat.S_ISDIR(node.mode):
            raise FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(int(inode))

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        """List "." (cookie 1), ".." (cookie 2), then the entries (cookie: dentry id + 2).

        pyfuse3 always answers with readdirplus, and the kernel counts a lookup for every
        entry it links, except "." and ".." (fuse_direntplus_link skips them; libfuse says
        the same): so those two are not counted here, and every other entry is.
        """
        ino = int(fh)
        if start_id < 2:
            dots = [(b".", ino, 1), (b"..", self._parent_dir(ino), 2)][start_id:]
            for name, dot_ino, cookie in dots:
                node = self.meta.get_inode(dot_ino)
                if node is None:
                    continue
                if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name),
                                             self._attr(node), cookie):
                    return
        for dentry_id, name, node, nblocks in self.meta.list_entries(ino, max(0, start_id - 2)):
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name),
                                         self._attr(node, nblocks), dentry_id + 2):
                break
            self._lookups[node.id] += 1

    def _parent_dir(self, ino: int) -> int:
        """The parent of directory `ino` (itself for the root, and for a removed directory)."""
        if ino == ROOT:
            return ROOT
        parent = self.meta.parent_of(ino)
        return ino if parent is None else parent

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self._fsync_inode(int(fh))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = time.monotonic()
        if now - self._statfs_at > STATFS_CACHE_SECONDS:  # counting scans whole tables
            self._statfs_counts = self.meta.counts()
            self._statfs_at = now
        files, sizes, stored_blocks = self._statfs_counts
        used = min(sizes, stored_blocks * self.bs)  # sparse files use only what they store
        s = pyfuse3.StatvfsData()
        total = 1 << 50  # an object store has no fixed size; report 1 PiB
        s.f_bsize = self.bs
        s.f_frsize = 4096
        s.f_blocks = total // s.f_frsize
        s.f_bfree = s.f_bavail = max(0, total - used) // s.f_frsize
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = s.f_files - files
        s.f_namemax = NAME_MAX
        return s

    # -- extended attributes ---------------------------------------------------------------

    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._writable()
        if len(name) > XATTR_NAME_MAX:
            raise FUSEError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FUSEError(errno.E2BIG)
        if name.startswith(b"system.posix_acl_"):
            # We do not enforce ACLs, so storing one would only hide the mode it carries:
            # `cp -a` sets modes through the ACL and falls back to chmod on ENOTSUP.
            raise FUSEError(errno.ENOTSUP)
        node = self._node(int(inode))
        with self._txn():
            self.meta.set_xattr(node.id, name, value)
            node.ctime_ns = now_ns()
            self.meta.save_inode(node)

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        value = self.meta.get_xattr(int(inode), name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(n) for n in self.meta.list_xattrs(int(inode))]

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._writable()
        node = self._node(int(inode))
        with self._txn():
            if not self.meta.remove_xattr(node.id, name):
                raise FUSEError(pyfuse3.ENOATTR)
            node.ctime_ns = now_ns()
            self.meta.save_inode(node)

    async def access(
        self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext
    ) -> bool:
        return True  # the kernel checks permissions itself (default_permissions)


def _guarded(fn: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
    """Turn any unexpected failure of a handler into an errno instead of a dead mount.

    pyfuse3 lets an exception other than FUSEError end its main loop, which would take the
    whole mount down for one bad request. A full disk becomes ENOSPC, any other OSError keeps
    its errno, and everything else is logged with its traceback and answered with EIO.
    """

    @functools.wraps(fn)
    async def handler(*args: object, **kwargs: object) -> object:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except sqlite3.OperationalError as e:
            if "full" in str(e):
                raise FUSEError(errno.ENOSPC) from None
            log.exception("metadata error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise FUSEError(errno.ENOSPC) from None
            log.exception("I/O error in %s", fn.__name__)
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return handler


for _name, _fn in list(vars(Operations).items()):
    if _name not in ("forget",) and not _name.startswith("_") and inspect.iscoroutinefunction(
        _fn
    ):
        setattr(Operations, _name, _guarded(_fn))
