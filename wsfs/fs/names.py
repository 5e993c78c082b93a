"""Creating, linking, renaming and removing names, and the marker rules for them."""

from __future__ import annotations

import errno
import logging
import sqlite3
import stat

import pyfuse3
from pyfuse3 import FUSEError

from ..meta import Inode
from ..meta.times import now_ns
from .base import (
    STATFS_CACHE_SECONDS,
    Base,
)

log = logging.getLogger(__name__)


class NameOps(Base):
    """Handlers that change directory entries."""

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
            try:
                self.meta.add_entry(parent, name, node.id)
            except sqlite3.IntegrityError:  # the name exists: cheaper than looking first
                raise FUSEError(errno.EEXIST) from None
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
        return self._open_handle(node.id, flags), self._entry(node)

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
        ts = now_ns()
        exists = False
        with self._txn():
            try:  # the kernel looked the name up already: it exists only after a race
                self.meta.add_entry(parent, new_name, node.id)
            except sqlite3.IntegrityError:  # nothing changed: no rollback (it empties caches)
                exists = True
            else:
                node.nlink += 1
                node.ctime_ns = ts
                self.meta.save_inode(node)
                self._touch_dir(dir_node, ts)
        if exists:
            raise FUSEError(errno.EEXIST)
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
        node = self.meta.lookup_node(parent, name)
        if node is None:
            raise FUSEError(errno.ENOENT)
        ino = node.id
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
        node = self.meta.lookup_node(parent, name)
        if node is None:
            raise FUSEError(errno.ENOENT)
        ino = node.id
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
