"""POSIX semantics: the pyfuse3 request handlers, and the workspace marker policy.

The handlers are grouped by what they change: `base` (shared state and helpers), `names`
(directory entries), `data` (file contents), `ranges` (fallocate and SEEK_DATA/SEEK_HOLE,
which `lowlevel` hands to libfuse: pyfuse3 has no handlers for them); lookups, attributes,
listings and xattrs are here. See `base` for the concurrency rules every handler follows.
"""

from __future__ import annotations

import bisect
import errno
import functools
import inspect
import itertools
import logging
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import perf_counter

import pyfuse3
from pyfuse3 import FUSEError

from ..meta import Inode
from ..meta.schema import MARKER, ROOT
from ..meta.times import now_ns
from .base import (
    LISTING_CACHE_DIR_MAX,
    LISTING_CACHE_ENTRIES,
    NAME_MAX,
    STATFS_CACHE_SECONDS,
    XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
    ListedEntry,
)
from .names import NameOps
from .ranges import RangeOps

log = logging.getLogger(__name__)

__all__ = ["MARKER", "ROOT", "Operations"]


def _unsupported_xattr(name: bytes) -> bool:
    """Attributes wsfs has no support for, refused and reported absent with ENOTSUP as a
    filesystem without them does (ext4 mounted noacl; FUSE has no per-file SELinux labels).

    POSIX ACLs are not enforced, so storing one would only hide the mode it carries (`cp -a`
    sets modes through the ACL and falls back to chmod on ENOTSUP). And ENOTSUP, unlike
    ENODATA, is remembered by `ls -l` for the whole filesystem (coreutils caches the device
    that does not support ACLs or SELinux contexts): with ENODATA it asked for both for every
    entry, two round trips per file and ~90 % of an `ls -lR` of 1,000 files.
    """
    return name.startswith(b"system.posix_acl_") or name == b"security.selinux"


class Operations(NameOps, RangeOps):
    """The filesystem as the kernel sees it."""

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = int(parent_inode)
        self._check_name(name)
        if name == b".":
            # The kernel looks "." up only to find an inode by its number when it holds it no
            # more (open_by_handle_at(2), an NFS export): then nothing has the inode open,
            # and one without a name is deleted (its deletion may still be pending: see
            # REAP_DELAY), its handles stale, as on ext4. Found, it came back to life.
            found = self.meta.get_inode_blocks(parent)
            if found is None or not found[0].nlink:
                raise FUSEError(errno.ENOENT)  # the kernel says ESTALE
        elif name == b"..":
            found = self.meta.get_inode_blocks(self._parent_dir(parent))
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
        found = self._meta_for(int(inode)).get_inode_blocks(int(inode))
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
        self._writable(ino)
        lock = self._locks.get(ino)
        if not fields.update_size and (lock is None or not lock.locked()):
            # No await and nobody holds the inode (a truncate keeps its copy of the inode
            # across awaits): atomic without taking the lock, which was a third of the cost
            # of the setattr the kernel sends at every close under the writeback cache.
            return self._set_fields(self._node(ino), attr, fields)
        async with self._lock(ino):
            node = self._node(ino)
            if fields.update_size:
                if stat.S_ISDIR(node.mode):
                    raise FUSEError(errno.EISDIR)
                if ino == self.marker_ino:
                    raise FUSEError(errno.EPERM)
                await self._truncate(node, attr.st_size)
                node.mtime_ns = node.ctime_ns = now_ns()
            return self._set_fields(node, attr, fields)

    def _set_fields(
        self, node: Inode, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> pyfuse3.EntryAttributes:
        """Apply and save the attributes a setattr sets, other than the size. The ctime is
        the kernel's when it sends one (it stamped the change: see meta/times.py), else now."""
        if node.id == self.marker_ino and not self._is_time_flush(node, attr, fields):
            raise FUSEError(errno.EPERM)
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
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now_ns()
        if node.nlink or self._open.get(node.id) or stat.S_ISDIR(node.mode):
            self.meta.save_inode(node)
        # else a deleted file the kernel is evicting: under the writeback cache it flushes
        # the ctime unlink(2) stamped just before it forgets the inode, and nothing can read
        # it again (one statement less for each file of an rm -r).
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

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(int(inode))
        if node.target is None:
            raise FUSEError(errno.EINVAL)
        return node.target

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
        changes = self.meta.dentry_changes
        if self._listed_at == changes and self._listed_to.get(ino) == start_id:
            return  # this listing already reached the end, and no entry changed since
        if start_id < 2:
            # The kernel links neither (see above): their attributes are never looked at,
            # only the inode number and type reach readdir(3).
            dots = [(b".", ino, 1), (b"..", self._parent_dir(ino), 2)][start_id:]
            for name, dot_ino, cookie in dots:
                a = pyfuse3.EntryAttributes()
                a.st_ino = dot_ino
                a.st_mode = stat.S_IFDIR
                if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), a, cookie):
                    return
        cookie = max(2, start_id)
        lookups = self._lookups
        for name, attr, entry_cookie in self._listing(ino, cookie):
            if not pyfuse3.readdir_reply(token, name, attr, entry_cookie):
                return
            lookups[attr.st_ino] += 1
            cookie = entry_cookie
        # The kernel asks once more, from the last cookie, to learn that the listing ended:
        # `ls -lR` and `git status` do that for every directory. Answer it without a query.
        if self._listed_at != changes:
            self._listed_at = changes
            self._listed_to.clear()
        self._listed_to[ino] = cookie

    def _listing(self, ino: int, after: int) -> Iterable[ListedEntry]:
        """The entries of directory `ino` past cookie `after`, from the listing cache while
        no metadata changed since it was filled; else from one query, which fills it when the
        listing starts at the beginning and the directory is small enough."""
        changes = (self.meta.total_changes, self.meta.dentry_changes)  # (the second also
        # grows at a rollback, after which the first stays where it was)
        if self._listings_at != changes:
            self._listings.clear()
            self._listings_at = changes
            self._listed_entries = 0
        cached = self._listings.get(ino)
        if cached is not None:
            cookies, entries = cached
            return itertools.islice(entries, bisect.bisect_right(cookies, after), None)
        rows = ((pyfuse3.FileNameT(name), self._attr(node, nblocks), dentry_id + 2)
                for dentry_id, name, node, nblocks in self.meta.list_entries(ino, after - 2))
        if after > 2:
            return rows
        entries = list(itertools.islice(rows, LISTING_CACHE_DIR_MAX + 1))
        if len(entries) > LISTING_CACHE_DIR_MAX:  # a big directory: page by page
            return itertools.chain(entries, rows)
        if self._listed_entries + len(entries) > LISTING_CACHE_ENTRIES:
            self._listings.clear()
            self._listed_entries = 0
        self._listings[ino] = ([c for _, _, c in entries], entries)
        self._listed_entries += len(entries)
        return entries

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
        try:  # the inodes waiting to be deleted are gone already for the counts
            self.reap()
        except (OSError, sqlite3.OperationalError) as e:  # a full disk: df must still answer
            log.warning("cannot delete %d unlinked inodes yet: %s", len(self._doomed), e)
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
        if _unsupported_xattr(name):
            raise FUSEError(errno.ENOTSUP)
        node = self._node(int(inode))
        with self._txn():
            self.meta.set_xattr(node.id, name, value)
            node.ctime_ns = now_ns()
            self.meta.save_inode(node)

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        value = self._meta_for(int(inode)).get_xattr(int(inode), name)
        if value is None:
            raise FUSEError(errno.ENOTSUP if _unsupported_xattr(name) else pyfuse3.ENOATTR)
        return value

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        meta = self._meta_for(int(inode))
        return [pyfuse3.XAttrNameT(n) for n in meta.list_xattrs(int(inode))]

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._writable()
        node = self._node(int(inode))
        with self._txn():
            if not self.meta.remove_xattr(node.id, name):
                raise FUSEError(errno.ENOTSUP if _unsupported_xattr(name) else pyfuse3.ENOATTR)
            node.ctime_ns = now_ns()
            self.meta.save_inode(node)

    async def access(
        self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext
    ) -> bool:
        return True  # the kernel checks permissions itself (default_permissions)

def _guarded(fn: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
    """Turn any unexpected failure of a handler into an errno instead of a dead mount, and
    time the handler (`wsfs_fuse_request_seconds`; ~0.3 µs a request, see wsfs/latency.py).

    pyfuse3 lets an exception other than FUSEError end its main loop, which would take the
    whole mount down for one bad request. A full disk becomes ENOSPC, any other OSError keeps
    its errno, and everything else is logged with its traceback and answered with EIO.
    """
    op = fn.__name__

    @functools.wraps(fn)
    async def handler(self: Operations, *args: object, **kwargs: object) -> object:
        start = perf_counter()
        try:
            return await fn(self, *args, **kwargs)
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
        finally:
            self.latencies.observe(op, perf_counter() - start)

    return handler


def guard_handlers(cls: type[Operations], names: Iterable[str] | None = None) -> None:
    """Wrap the handlers of `cls` in `_guarded`: every one it has (Operations, below), or
    `names` only (a subclass's own: `vars(cls)`)."""
    for name in dir(cls) if names is None else names:
        fn = getattr(cls, name)
        if name != "forget" and not name.startswith("_") and inspect.iscoroutinefunction(fn):
            setattr(cls, name, _guarded(fn))


guard_handlers(Operations)
