"""fsync(2) of dirty blocks: through the data journal (journal.py) when the new bytes are
few, else through the blocks' own files, with the metadata's sync in the same round.

The journal's rules (journal.py's docstring) decide when an epoch may end; this module keeps
them: a block the journal holds is synced only through it, and an epoch ends only once every
metadata change is durable. This layer knows no metadata: the caller of `fsync` (the fs
layer) passes what makes it durable, a `MetadataSync`. When a half of the journal is full, the
next epoch starts in the other half and the full one is retired in the background
(`retire_older_epochs`, run by the block cache's upkeep): syncing the blocks it holds took
the fsync that found it full 50-250 ms.

Where the disk flushes run. Handing a blocking call to a worker thread and back costs two
wake-ups, each waiting for a free core: 0.15-0.2 ms on an idle machine, a mean of ~0.8 ms
on 2 busy cores, more than the fdatasync(2) of an fsync's journal records (at most
FSYNC_MAX) or of a few pages of the metadata WAL on a disk that is not congested (0.1-1 ms).
So those small syncs run on the trio thread, one after the other, while their durations
(a moving average, wherever they ran) stay below INLINE_BELOW; every bigger sync, and small
ones while the disk is congested, run in worker threads at once. Other requests wait for an
inline sync: benchmarks/fsyncpath.py measured fsyncs 0.77x as long and 0.92x the CPU, and
the wait of a request arriving during an fsync storm 0.8x at the median, 1.26x at p99
(docs/design.md, "Speed on the hot paths"); a congested disk moves the syncs off the trio
thread after one or two slow ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

import trio

from .dirty import DirtyBlocks
from .journal import FSYNC_MAX, GROW, Journal
from .space import DiskSpace

log = logging.getLogger(__name__)

INLINE_BELOW = 0.002  # seconds: small syncs run on the trio thread while they take less
SYNC_TIME_WEIGHT = 0.2  # of the newest small sync's duration in their moving average
RETIRE_RETRY = 1.0  # seconds before a failed retirement of the journal's full half is retried


class MetadataSync(Protocol):
    """What an fsync through the journal needs of the metadata's owner (the fs layer)."""

    async def durable_metadata(self) -> None:
        """Make every metadata change so far durable: a journal epoch ends only after it."""


class Fsync:
    """Makes dirty blocks durable on the local disk (see the module docstring)."""

    def __init__(self, dirty: DirtyBlocks, *, journal: Journal, space: DiskSpace,
                 local_limiter: trio.CapacityLimiter) -> None:
        self.dirty = dirty
        self.journal = journal
        self.space = space  # the journal may not grow into the metadata's reserve
        # Requests have their own threads: a caller of fsync(2) must never queue behind uploads.
        self.local_limiter = local_limiter
        # Blocks being fsynced right now (an event set when that fsync(2) ends).
        self._syncing: dict[str, trio.Event] = {}
        self._journal_ready = False  # appends only once `replay` has run
        self._journal_lock = trio.Lock()  # an epoch's end keeps appends out (rule 3)
        self._retire_lock = trio.Lock()  # one retirement of the older epoch at a time
        self._retire_due = trio.Event()  # the journal switched halves: retire the older one
        self.sync_time = 0.0  # moving average of small syncs' durations (s), wherever they ran
        self.inline = True  # False: every sync in a worker thread (benchmarks/fsyncpath.py)
        # What makes the metadata durable for the background retirement of the older
        # epoch: that of the fsync that started the newer one.
        self._retire_with: MetadataSync | None = None

    def replay(self, wanted: Callable[[str], bool]) -> None:
        """Replay the data journal into the blocks that are `wanted` (the metadata awaits
        their upload); appends may follow."""
        self.journal.replay(self.dirty.files.dir, wanted)
        self._journal_ready = True

    async def fsync(self, block_ids: list[str], also: Callable[[], None] | None = None,
                    *, also_small: bool = False, metadata: MetadataSync | None = None) -> None:
        """Make the given dirty blocks durable on the local disk.

        Only blocks written since their last fsync(2) are synced again (a random writer of a
        big file touches a few of its blocks between two fsyncs). A block whose fsync(2)
        another caller is running is waited for: its return is what makes it durable.
        `also` is a blocking job run in parallel (the metadata's sync), so that a caller
        waits for one round of disk flushes, not two. Up to FSYNC_MAX new bytes go into the
        journal (journal.py), synced once; more, and the blocks' own files are synced.
        `also_small`: `also` syncs a few pages at most, so it may run on the trio thread
        with the journal's sync (see the module docstring). `metadata` makes the metadata
        durable when an epoch of the journal ends; without it the journal is not used.
        """
        while True:
            running = [self._syncing[b] for b in block_ids if b in self._syncing]
            if not running:
                break
            for event in running:
                await event.wait()
        unsynced, lengths = self.dirty.unsynced, self.dirty.lengths
        todo = {b: unsynced.pop(b) for b in block_ids
                if b in unsynced and b in lengths}  # a write from now on marks it again
        if not todo and also is None:
            return
        done = trio.Event()
        for b in todo:
            self._syncing[b] = done
        ok = False
        try:
            if not await self._journal_fsync(todo, also, also_small, metadata):
                await self._files_fsync(list(todo), also, metadata)
            ok = True
        finally:
            for b, ranges in todo.items():
                del self._syncing[b]
                if not ok and b in lengths:
                    unsynced.setdefault(b, []).extend(ranges)
            done.set()

    async def _journal_fsync(self, todo: dict[str, list[tuple[int, int]]],
                             also: Callable[[], None] | None, also_small: bool,
                             metadata: MetadataSync | None) -> bool:
        """fsync by the journal: append the written ranges, sync it (and `also`) once.
        False if this fsync is not for the journal (too big, full, not ready, a full disk,
        no `metadata` to end an epoch with)."""
        journal = self.journal
        if not todo or not self._journal_ready or metadata is None:
            return False
        ranges = {b: _merged(r) for b, r in todo.items()}
        size = sum(end - start for rs in ranges.values() for start, end in rs)
        if size > FSYNC_MAX:
            return False
        async with self._journal_lock:
            if journal.has_records and not journal.live:
                await self._restart_journal(metadata)  # rule 3: none of its blocks is dirty
            count = sum(len(rs) for rs in ranges.values())
            if not journal.fits(count, size):
                if journal.older is not None:  # the other half is not free yet: wait for it
                    await self._retire_older(metadata)
                journal.switch()  # the next epoch in the other half; this one retires later
                self._retire_with = metadata
                self._retire_due.set()
                if not journal.fits(count, size):
                    return False
            if journal.grows(count, size) and self.space.disk_free() < self.space.reserve + GROW:
                return False  # its growth would eat the metadata's reserve on the cache disk
            files = self.dirty.files
            records = [(b, start, os.pread(files.fd(b), end - start, start))
                       for b, rs in ranges.items() for start, end in rs]
            try:
                journal.append(records)
            except OSError as e:
                log.debug("cannot append to the data journal: %s", e)
                return False
        jobs = [journal.sync] if also is None else [journal.sync, also]
        if also is not None and not also_small:
            await self._run_parallel(jobs)
        elif self.inline and self.sync_time < INLINE_BELOW:
            self._run_inline(jobs)  # small: the records (at most FSYNC_MAX), a few pages
        else:
            await self._run_parallel([partial(self._timed, job) for job in jobs])
        return True

    async def _files_fsync(self, todo: list[str], also: Callable[[], None] | None,
                           metadata: MetadataSync | None) -> None:
        """fsync by the blocks' own files, all in parallel with `also`. A block an epoch of
        the journal holds ends that epoch first (rule 2): the older one is retired, or every
        block the current one holds is synced, then the new epoch is made durable."""
        journal = self.journal
        if not journal.holds(todo):
            await self._sync_files(todo, also)
            return
        async with self._journal_lock:
            if journal.older is not None and not journal.older.live.isdisjoint(todo):
                await self._retire_older(metadata)
            if journal.live.isdisjoint(todo):
                await self._sync_files(todo, also)
                return
            held = [b for b in journal.live if b not in todo]  # (all dirty: `Journal.let_go`)
            await self._sync_files(todo + held, also)
            await self._restart_journal(metadata)
            await self._run_parallel([journal.sync])

    async def _restart_journal(self, metadata: MetadataSync | None) -> None:
        """End the journal's epoch (holding `_journal_lock`): first every metadata change
        is made durable, so a block the journal stopped holding because it was dropped stays
        dropped after a crash (else its data would be gone and the metadata still name it)."""
        assert metadata is not None  # (the journal holds blocks only through fsyncs with it)
        while True:
            drops = self.journal.drops
            await metadata.durable_metadata()
            if drops == self.journal.drops:  # no held block was dropped meanwhile
                break
        self.journal.restart()

    async def retire_older_epochs(self) -> None:
        """Retire the older epoch whenever the journal switched halves (runs for good): off
        the path of any fsync, which waits for it only when the current half fills first."""
        while True:
            await self._retire_due.wait()
            self._retire_due = trio.Event()
            try:
                await self._retire_older(self._retire_with)
            except Exception as e:  # a failing disk: fsyncs report it; try again later
                log.warning("cannot retire the full half of the data journal: %s", e)
                await trio.sleep(RETIRE_RETRY)
                self._retire_due.set()

    async def _retire_older(self, metadata: MetadataSync | None) -> None:
        """Retire the older epoch (rule 3): sync the files of the blocks it holds (their
        bytes since its records included, so the records are no longer needed), make every
        metadata change durable (a block it held that was dropped stays dropped), then zero
        its header and sync that. Appends to the current epoch go on meanwhile."""
        async with self._retire_lock:
            older = self.journal.older
            if older is None:
                return
            assert metadata is not None  # (the journal holds blocks only through fsyncs with it)
            synced: set[str] = set()
            while True:
                todo = [b for b in older.live if b not in synced]  # (all dirty: `let_go`)
                if todo:
                    await self._sync_files(todo, None)
                    synced.update(todo)
                    continue
                drops = self.journal.drops
                await metadata.durable_metadata()
                if drops == self.journal.drops and older.live <= synced:
                    break
            self.journal.retire_older()
            await self._run_parallel([self.journal.sync])

    async def _sync_files(self, block_ids: list[str], also: Callable[[], None] | None) -> None:
        # Duplicates: the trio thread may close a block's fd while the worker fsyncs it (an
        # upload retiring the block, or the fd LRU), which made fsync(2) fail with EBADF.
        files = self.dirty.files
        fds = [os.dup(files.fd(b)) for b in block_ids]
        try:
            # fdatasync: the block's length and allocation, not its mtime (unused). Each
            # sync in a worker call of its own, all in parallel: fewer calls, each syncing a
            # few files one after another, saved hand-offs but serialized disk flushes, and
            # in interleaved runs through a mount that won on an idle disk and lost on a busy
            # one (SQLite and random writes, 8-12 pairs each way).
            jobs: list[Callable[[], None]] = [partial(os.fdatasync, fd) for fd in fds]
            await self._run_parallel(jobs if also is None else [*jobs, also])
        finally:
            for fd in fds:
                os.close(fd)

    def _run_inline(self, jobs: list[Callable[[], None]]) -> None:
        """Run small blocking syncs on the trio thread, one after the other (a failure is
        raised as itself: the fsync fails, and the next one syncs again)."""
        for job in jobs:
            self._timed(job)

    def _timed(self, job: Callable[[], None]) -> None:
        """Run a small sync, counting its duration into `sync_time` (two worker threads
        counting at once may lose one count: harmless to an average)."""
        start = time.monotonic()
        try:
            job()
        finally:
            took = time.monotonic() - start
            self.sync_time += SYNC_TIME_WEIGHT * (took - self.sync_time)

    async def _run_parallel(self, jobs: list[Callable[[], None]]) -> None:
        """Run blocking jobs in worker threads at once; raise the first failure as itself
        (ENOSPC, EIO), not in a group."""
        errors: list[Exception] = []

        async def run(job: Callable[[], None]) -> None:
            try:
                await trio.to_thread.run_sync(job, limiter=self.local_limiter)
            except Exception as e:
                errors.append(e)

        if len(jobs) == 1:  # (most fsyncs: one block) without a nursery's scheduling
            await run(jobs[0])
        else:
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(run, job)
        if errors:
            raise errors[0]


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges (start, end) sorted, with overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        elif end > start:
            out.append((start, end))
    return out
