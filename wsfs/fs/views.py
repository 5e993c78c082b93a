"""A read-only view of a published checkpoint, and its move to newer ones.

`wsfs mount -o ro` serves a checkpoint the store holds, without the lease: a past one
(`--at`), which never changes, or the newest one, followed as the writer publishes (the
daemon fetches each and calls `switch`). Every write is refused with EROFS (`_writable`: a
view is read-only for good, whatever `mount -o remount,rw` tells the kernel), and nothing is
ever deleted, not even an inode the checkpoint holds unlinked: the view's metadata is a
private copy of the checkpoint and nothing here changes it.

**What a reader sees while the view moves.** Names and listings follow the newest checkpoint
the daemon has: a lookup, a readdir and a readlink answer from it, so paths resolve there, as
on a local filesystem that the writer changes under its readers. A file, once open, stays as
it was in the checkpoint it was opened on until its last handle is closed: every read through
any handle, its attributes (fstat, stat through any name) and its xattrs come from that
checkpoint, and opens made meanwhile share it (the kernel keeps one page cache and one set of
attributes per inode, so the daemon serves one version of an inode at a time). Only at its
last close does the file move to the newest checkpoint. So a file is never read as a mix of
two versions; and a reader that wants several files from one state opens them all before
reading, or the writer replaces them as a group with one rename (of a directory, or of a
symlink to one), which every checkpoint shows wholly before or wholly after.

**The kernel's caches.** Entries and attributes are cached for `cache_timeout` (long) and
pages across opens (`keep_cache`), as on a writable mount; so when the view moves, the
kernel is told to forget exactly what changed (meta/compare.py): each changed inode it knows
(its attributes and pages), unless it is open (then at its last close), and each entry that
changed in a directory it knows (a cached miss included). The notifications go from a worker
thread, never from a handler: the kernel may wait in one for a request in flight on the same
directory or pages, and the trio thread must be free to answer that request. A view mount
runs without the writeback cache, under which the kernel would keep its own sizes and times
of files and never take the newer ones.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Protocol

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..blocks import BlockCache
from ..latency import Latencies
from ..meta import BlockRef, Inode, Metadata
from ..meta.compare import Changes, inode_differs
from ..meta.schema import MARKER, ROOT
from . import Operations, guard_handlers
from .base import STATFS_CACHE_SECONDS, WRITE_FLAGS

log = logging.getLogger(__name__)


class View:
    """One published checkpoint, opened: what a read-only mount serves."""

    __slots__ = ("created_ns", "meta", "seq")

    def __init__(self, seq: int, created_ns: int, meta: Metadata) -> None:
        self.seq = seq
        self.created_ns = created_ns  # when the writer published it
        self.meta = meta

    def __repr__(self) -> str:
        return f"View({self.seq})"


class KernelCaches(Protocol):
    """What the kernel is told to forget (blocking; from a worker thread)."""

    def forget_inode(self, ino: int) -> None: ...

    def forget_entry(self, parent: int, name: bytes) -> None: ...


class FuseKernel:
    """The FUSE kernel module's caches, through libfuse's notifications."""

    def forget_inode(self, ino: int) -> None:
        self._quietly(pyfuse3.invalidate_inode, pyfuse3.InodeT(ino))

    def forget_entry(self, parent: int, name: bytes) -> None:
        self._quietly(pyfuse3.invalidate_entry, pyfuse3.InodeT(parent),
                      pyfuse3.FileNameT(name))

    @staticmethod
    def _quietly(notify: Callable[..., None], *args: object) -> None:
        try:
            notify(*args)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel had nothing of it cached
                log.warning("the kernel did not take a cache invalidation: %s", e)


class ViewOperations(Operations):
    """The filesystem of a read-only view (see the module docstring)."""

    enable_writeback_cache = False

    def __init__(
        self,
        view: View,
        blocks: BlockCache,
        *,
        cache_timeout: float = 300.0,
        latencies: Latencies | None = None,
        kernel: KernelCaches | None = None,
        retire: Callable[[View], None] | None = None,
    ) -> None:
        """`retire` is called with a view that nothing uses any more (neither current nor
        holding an open file): its metadata can be closed and its database deleted."""
        super().__init__(view.meta, blocks, cache_timeout=cache_timeout, read_only=True,
                         latencies=latencies)
        self.view = view
        self.kernel: KernelCaches = kernel if kernel is not None else FuseKernel()
        self.retire = retire
        self._pinned: dict[int, View] = {}  # open inode -> the view its handles read
        self._pins: dict[View, int] = {}  # view -> open inodes pinned to it
        self._forget_inodes: set[int] = set()
        self._forget_entries: set[tuple[int, bytes]] = set()
        self._forget_due = trio.Event()
        self.moves = 0  # views switched to
        self.forgotten = 0  # invalidations the kernel was sent

    # -- which checkpoint answers ----------------------------------------------------------

    def _meta_for(self, ino: int) -> Metadata:
        pinned = self._pinned.get(ino)
        return self.meta if pinned is None else pinned.meta

    def _attr(self, node: Inode, nblocks: int | None = None) -> pyfuse3.EntryAttributes:
        pinned = self._pinned.get(node.id)
        if pinned is not None and pinned is not self.view:  # (looked up in the newest view)
            found = pinned.meta.get_inode_blocks(node.id)
            if found is not None:
                node, nblocks = found
        return super()._attr(node, nblocks)

    def _block_now(self, ino: int, ref: BlockRef) -> BlockRef | None:
        """A block of an older checkpoint may have moved to another pack since (repack.py),
        and its old pack be gone: the newest view knows where it is now. Anything else is
        the checkpoint's data gone from the store (`ref`: EIO); never a hole."""
        now = self.meta.blocks_in(ino, ref.idx, ref.idx).get(ref.idx)
        return now if now is not None and now.id == ref.id else ref

    def _maybe_delete(self, ino: int) -> None:
        pass  # a view deletes nothing (see the module docstring)

    def reap(self) -> None:
        pass

    # -- open files keep their checkpoint --------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        ino = int(inode)
        if flags & WRITE_FLAGS:
            self._writable()
        view = self._pinned.get(ino, self.view)
        if view.meta.get_inode(ino) is None:
            raise FUSEError(errno.ENOENT)
        if ino not in self._pinned:
            self._pinned[ino] = view
            self._pins[view] = self._pins.get(view, 0) + 1
        return self._open_handle(ino, flags)

    def _last_closed(self, ino: int) -> None:
        view = self._pinned.pop(ino, None)
        if view is None:
            return
        if view is not self.view:
            # The file moves to the newest view: the kernel forgets the version it cached.
            self._listings.clear()  # (entries listed since carry the pinned attributes)
            if inode_differs(view.meta, self.meta, ino):
                self._forget_inodes.add(ino)
                self._forget_due.set()
        left = self._pins[view] - 1
        if left:
            self._pins[view] = left
        else:
            del self._pins[view]
            if view is not self.view:
                self._retire(view)

    def _retire(self, view: View) -> None:
        if self.retire is not None:
            self.retire(view)

    def pinned_views(self) -> list[View]:
        """The older views files still open read (each until its last one is closed)."""
        return [v for v in self._pins if v is not self.view]

    # -- moving to a newer checkpoint ------------------------------------------------------

    def switch(self, view: View, changes: Changes) -> None:
        """Serve `view` from now on; `changes` is what differs from the current one (in the
        trio thread, atomically: a request is answered wholly from one view or the other)."""
        old = self.view
        self.view, self.meta = view, view.meta
        self.marker_ino = view.meta.lookup(ROOT, MARKER)
        # What was computed from the old view's metadata: listings and their ends (their
        # change counters are the new metadata's now), statfs's counts, the prefetched dirs.
        self._listings.clear()
        self._listings_at = (-1, -1)
        self._listed_to.clear()
        self._listed_at = -1
        self._statfs_at = -STATFS_CACHE_SECONDS
        self._prefetched_dirs.clear()
        known = self._lookups
        self._forget_inodes.update(
            ino for ino in changes.inodes
            if (ino in known or ino == ROOT) and ino not in self._pinned)
        self._forget_entries.update(
            (parent, name) for parent, name in changes.entries
            if parent in known or parent == ROOT)
        self.moves += 1
        self._forget_due.set()
        if old not in self._pins:
            self._retire(old)

    async def keep_kernel_current(self) -> None:
        """Send the kernel what to forget, from a worker thread, as `switch` and last closes
        queue it (a task of the mount's nursery)."""
        while True:
            await self._forget_due.wait()
            self._forget_due = trio.Event()
            inodes, entries = self._forget_inodes, self._forget_entries
            self._forget_inodes, self._forget_entries = set(), set()
            if inodes or entries:
                await trio.to_thread.run_sync(self._forget, inodes, entries)

    def _forget(self, inodes: set[int], entries: set[tuple[int, bytes]]) -> None:
        for ino in inodes:
            self.kernel.forget_inode(ino)
        for parent, name in entries:
            self.kernel.forget_entry(parent, name)
        self.forgotten += len(inodes) + len(entries)


guard_handlers(ViewOperations, list(vars(ViewOperations)))
