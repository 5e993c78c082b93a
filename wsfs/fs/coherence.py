"""Keeping the kernel's page cache right when a file is written with O_DIRECT.

wsfs lets the kernel keep a file's pages across opens (`keep_cache`): only this daemon
changes the files, and every change but one reaches it through those pages. The one is a
direct write (a handle opened with O_DIRECT). The kernel drops the pages of the written range
before it sends such a write, and again after it, but only for a synchronous one: an
asynchronous direct write (io_submit(2), io_uring) completes without that second pass. A
buffered read of the range that the daemon answered in between, before it applied the
write, leaves the old bytes in the page cache, and every buffered reader sees them until the
pages are evicted. So after applying a direct write, the daemon drops the file's cached pages
itself (FUSE_NOTIFY_INVAL_INODE), before it answers the write: when the writer learns that its
write completed, no page holds what it replaced.

The rules that make this sound:

1. A read answered before the write was applied filled its pages before the invalidation
   begins (its reply is written first, and a page being filled is locked, which the
   invalidation waits for): the invalidation drops them.
2. A read that began before the write was applied and was still waiting (for a download)
   when it was applied could answer the old bytes after the invalidation: such a read is
   started again (`read_is_stale`).
3. Only reads fill pages with what the daemon holds, so an inode nobody read since its last
   invalidation has nothing to drop: fio-style direct I/O without buffered readers costs no
   invalidation at all (`read_answered`).

The invalidation must not block the daemon's one thread: dropping a dirty page first writes
it back, a write this daemon must answer, and a page under writeback is waited for. So it
runs in a worker thread while the daemon goes on serving requests. The handler waits for it
before answering, with one exception: a writeback of cached pages can arrive through the
direct handle too (the kernel writes a file's dirty pages back through any of its writable
handles), and its own pages stay under writeback until it is answered, so waiting for an
invalidation then would never end. Cached pages are dirtied through a writable handle opened
without O_DIRECT (or its mapping, which keeps it open), so while the file has one, the
invalidation is started and not waited for: writers mixing buffered and direct writes on one
file get no ordering between the two from ext4 either. The one case left, a shared writable
mapping of the direct handle itself, is bounded by INVALIDATE_WAIT.

pyfuse3 invalidates whole files only (`invalidate_inode`); the kernel would take a range.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import defaultdict
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# How long a direct write waits for its invalidation before it answers anyway (see above: only
# a writeback through the direct handle of its own mapping ever needs the bound).
INVALIDATE_WAIT = 1.0


class DirectWrites:
    """Which handles write directly, and the page-cache invalidations their writes need."""

    def __init__(self, invalidate: Callable[[int], None]) -> None:
        self._invalidate = invalidate  # drop an inode's cached pages (blocking; any thread)
        self._direct: set[int] = set()  # handles opened for writing with O_DIRECT
        self._cached_writer_fhs: set[int] = set()  # handles opened for writing without it
        self._cached_writers: dict[int, int] = defaultdict(int)  # inode -> such handles
        self._applied: dict[int, int] = defaultdict(int)  # inode -> direct writes applied
        self._paged: set[int] = set()  # inodes read since their last invalidation began
        self.invalidations = 0

    def opened(self, fh: int, ino: int, flags: int) -> None:
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return
        if flags & os.O_DIRECT:
            self._direct.add(fh)
        else:
            self._cached_writer_fhs.add(fh)
            self._cached_writers[ino] += 1

    def released(self, fh: int, ino: int) -> None:
        self._direct.discard(fh)
        if fh in self._cached_writer_fhs:
            self._cached_writer_fhs.discard(fh)
            self._cached_writers[ino] -= 1
            if self._cached_writers[ino] <= 0:
                del self._cached_writers[ino]

    def has_cached_writers(self, ino: int) -> bool:
        """Whether a handle opened for writing without O_DIRECT holds `ino` open: only then
        can the kernel hold dirty pages of it not yet handed over (close(2) writes them back,
        and a mapping keeps its handle open)."""
        return bool(self._cached_writers.get(ino))

    def is_direct(self, fh: int) -> bool:
        return fh in self._direct

    def read_began(self, ino: int) -> int:
        """A token for `read_is_stale`: call before a read looks at the file."""
        return self._applied.get(ino, 0)

    def read_is_stale(self, ino: int, token: int) -> bool:
        """Whether a direct write was applied since `read_began` gave `token` (rule 2)."""
        return self._applied.get(ino, 0) != token

    def read_answered(self, ino: int) -> None:
        """A read of `ino` is about to be answered: its pages may be cached (rule 3)."""
        self._paged.add(ino)

    async def applied(self, ino: int, nursery: trio.Nursery | None) -> None:
        """A direct write to `ino` was applied: drop the pages a read may have cached (in
        `nursery` without waiting, while a buffered writer has the file open)."""
        self._applied[ino] += 1
        if ino not in self._paged:
            return
        self._paged.discard(ino)
        self.invalidations += 1
        if self._cached_writers.get(ino) and nursery is not None:
            nursery.start_soon(self._invalidate_in_thread, ino)  # a writeback may be this write
            return
        with trio.move_on_after(INVALIDATE_WAIT) as waited:
            await self._invalidate_in_thread(ino)
        if waited.cancelled_caught:
            log.warning("dropping the cached pages of inode %d took over %.0f s; answered the "
                        "direct write before", ino, INVALIDATE_WAIT)

    async def _invalidate_in_thread(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(self._invalidate, ino, abandon_on_cancel=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # the kernel forgot the inode: it caches nothing
                log.warning("cannot drop the cached pages of inode %d: %s", ino, e)
