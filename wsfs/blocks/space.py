"""The cache disk's free space: the metadata's reserve, the ballast, and writers on a full disk.

Dirty blocks can only leave the disk by an upload, so a disk full of them must still let the
metadata commit and the checkpoint be published (the reserve and the ballast below), and a
writer that finds the disk full waits for uploads and evictions instead of failing at once.
Checking the disk for every write is too dear, so writers are judged by an estimate while it
is recent and far from the edge.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Protocol

import trio

from .clean import CleanCache

log = logging.getLogger(__name__)

# Free space kept on the cache disk for the metadata (meta.db, its WAL and the checkpoint
# copy): dirty data may not eat into it, so a disk full of dirty data can still commit
# metadata and publish the checkpoint that lets the dirty blocks go. The sync layer raises it
# as the database grows.
MIN_RESERVE = 8 << 20
# A file of this size is kept in the cache dir as ballast and deleted the moment a metadata
# commit finds the disk nearly full: writers that overshoot the reserve together (several
# in-flight writes pass the check at once) must never make a commit fail, because SQLite
# rolls a failed commit back and with it every change of the group.
BALLAST = 4 << 20
# A writer's check for free disk space uses an estimate (the last statvfs(2) minus the bytes
# written since) while it is younger than this many seconds and more than FREE_MARGIN above
# what the writer needs; otherwise it asks the disk again. statvfs(2) on every write was a
# third of the cost of a small file's write request.
FREE_REFRESH = 0.05
FREE_MARGIN = 64 << 20
# Bytes a write is counted as taking from the estimate beyond its length: a new file's first
# allocation (a 100-byte file takes a 4 KiB block), so the estimate never runs ahead of the disk.
ALLOC_SLACK = 4096


class Freeing(Protocol):
    """What a writer waiting on a full disk watches for progress (the dirty blocks)."""

    dirty_bytes: int  # uploads lower it

    def space_coming(self) -> bool:
        """Whether deleted blocks are about to free disk space."""
        ...


class DiskSpace:
    """Free-space accounting of the cache disk (see the module docstring)."""

    def __init__(self, cache_dir: Path, dirty_dir: Path, *, block_size: int, clean: CleanCache,
                 full_timeout: float) -> None:
        self.dirty_dir = dirty_dir  # statvfs(2) asks about the disk it is on
        self.block_size = block_size
        self.clean = clean  # its copies are evicted for writers first
        self.full_timeout = full_timeout
        self.reserve = MIN_RESERVE
        self._filled = trio.Event()  # set, and replaced, when a writer finds the disk full
        self._disk_full_since: float | None = None  # a writer got ENOSPC; no space since
        self.ballast = cache_dir / "ballast"
        # The free-space estimate of `wait_for_disk`: statvfs(2)'s answer, when it was asked
        # (monotonic seconds), and the bytes written into dirty blocks since.
        self._free_seen = 0
        self._free_seen_at = -FREE_REFRESH
        self._written_since = 0

    def wrote(self, nbytes: int) -> None:
        """Count `nbytes` written into dirty blocks against the free-space estimate."""
        self._written_since += nbytes + ALLOC_SLACK

    def disk_free(self) -> int:
        st = os.statvfs(self.dirty_dir)
        return st.f_bavail * st.f_frsize

    def has_room(self, size: int) -> bool:
        """Whether a write of `size` bytes fits (judged by the estimate when it can be)."""
        need = self._needed(size)
        if self._free_estimate(need) >= need:
            self._disk_full_since = None
            return True
        return False

    def _free_estimate(self, need: int) -> int:
        """The free space of the cache disk for a writer that needs `need` bytes: estimated
        from the last statvfs(2) while that is recent and far from `need`, else asked anew
        (so a nearly full disk is always judged by the disk itself)."""
        now = time.monotonic()
        estimate = self._free_seen - self._written_since
        if now - self._free_seen_at < FREE_REFRESH and estimate >= need + FREE_MARGIN:
            return estimate
        self._written_since = 0
        self._free_seen = self.disk_free()
        self._free_seen_at = now
        return self._free_seen

    def _needed(self, size: int) -> int:
        # A write may also copy a whole block (copy on write) before writing into it.
        return self.reserve + size + 2 * self.block_size

    def could_hold(self, size: int, freeable: int) -> bool:
        """Whether `size` more bytes could ever fit, were `freeable` bytes (clean copies,
        dirty blocks once uploaded) all freed."""
        return self.disk_free() + freeable >= self._needed(size)

    def room_to_keep(self, size: int) -> bool:
        """Whether a clean copy of `size` bytes fits without eating into the writers' room."""
        return self.disk_free() >= self._needed(size)

    async def wait_for_disk(self, size: int, freeing: Freeing) -> None:
        """Wait while the cache disk is full (`has_room` said no).

        Writers wait while clean blocks are evicted and uploads free dirty ones; only when
        no space has been freed for `full_timeout` seconds (the disk is full of dirty data
        that cannot be uploaded) does the write fail with ENOSPC, and later writes fail at
        once until space is freed.
        """
        need = self._needed(size)
        await self.clean.evict(need - self.disk_free())
        if self.disk_free() >= need:
            return
        if self._disk_full_since is not None and not freeing.space_coming():
            raise OSError(errno.ENOSPC, "the cache disk is full of dirty data")
        log.warning("the cache disk is full (%d bytes free, %d dirty): writers wait for uploads",
                    self.disk_free(), freeing.dirty_bytes)
        self._filled.set()  # wakes `wait_filled`: the sync layer flushes now
        self._filled = trio.Event()
        last_free, last_dirty = self.disk_free(), freeing.dirty_bytes
        last_progress = trio.current_time()
        while True:
            await trio.sleep(0.1)
            free = self.disk_free()
            if free >= need:
                self._disk_full_since = None
                return
            if free > last_free or freeing.dirty_bytes < last_dirty:
                last_progress = trio.current_time()
            last_free, last_dirty = free, freeing.dirty_bytes
            # another writer already gave up (unless deletions are about to free space)
            if self._disk_full_since is not None and not freeing.space_coming():
                raise OSError(errno.ENOSPC, "the cache disk is full of dirty data")
            if trio.current_time() - last_progress > self.full_timeout:
                self._disk_full_since = trio.current_time()
                log.error("the cache disk is full of dirty data that cannot be uploaded "
                          "(%d bytes dirty): writes fail with ENOSPC until uploads or "
                          "deletions free space", freeing.dirty_bytes)
                raise OSError(errno.ENOSPC, "the cache disk is full of dirty data")
            await self.clean.evict(need - free)

    async def wait_filled(self) -> None:
        """Return once a writer finds the cache disk full. Dirty blocks leave the disk only
        by an upload: the sync layer waits on this to flush at once, not at its next due
        time (sync/flusher.py)."""
        await self._filled.wait()

    def make_commit_room(self) -> None:
        """Before a metadata commit: if the disk is nearly full, give up the ballast."""
        if self.disk_free() < BALLAST and self.ballast.exists():
            log.warning("the cache disk is full: releasing its %d MiB ballast for the metadata",
                        BALLAST >> 20)
            self.ballast.unlink(missing_ok=True)

    def keep_ballast(self) -> None:
        """(Re)create the ballast once there is room for it beside the reserve (blocking)."""
        if not self.ballast.exists() and self.disk_free() > self.reserve + 4 * BALLAST:
            tmp = self.ballast.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, BALLAST)
            tmp.replace(self.ballast)
