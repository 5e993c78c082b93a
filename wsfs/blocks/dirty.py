"""The dirty pool: blocks written locally and not yet uploaded, from creation to retirement.

A dirty block is *writable* until the sync layer seals it for upload; a sealed block is never
changed again (a write to it goes to a fresh copy), so an upload reads a stable snapshot
without locks. Writes are plain pwrite(2) into the page cache: a crash of the daemon loses
nothing, and fsync(2) of a file fsyncs its dirty blocks (fsync.py; the ranges written since
the last one are recorded here). Dirty blocks are never evicted: over the dirty limit,
writers wait for uploads. Their files are dirtyfiles.py's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import trio

from .clean import CleanCache
from .dirtyfiles import DirtyFiles
from .files import copy_all, pwrite_all
from .journal import Journal
from .space import DiskSpace

log = logging.getLogger(__name__)

MAX_RANGES = 64  # ranges written since an fsync kept per block; more are merged into one


class DirtyBlocks:
    """The dirty blocks by id: their lengths, ages, unsynced ranges and upload states."""

    def __init__(self, files: DirtyFiles, *, space: DiskSpace, clean: CleanCache,
                 journal: Journal, dirty_limit: int,
                 local_limiter: trio.CapacityLimiter) -> None:
        self.files = files
        self.space = space  # counts what is written against its free-space estimate
        self.clean = clean  # a copy on write may come from a clean copy
        self.journal = journal  # a dropped block leaves it (`Journal.let_go`)
        self.dirty_limit = dirty_limit
        self.local_limiter = local_limiter
        self.lengths: dict[str, int] = {}  # id -> length of the local file
        self.dirty_bytes = 0  # their sum
        self._since: dict[str, float] = {}  # id -> monotonic time it became dirty
        # Dirty blocks written since their last fsync(2), with the ranges written (start,
        # end): fsync skips blocks already on the disk, and journals small ranges (fsync.py).
        self.unsynced: dict[str, list[tuple[int, int]]] = {}
        self._sealed: set[str] = set()
        # Blocks made from a reservation (reserved.py) and writable since: the disk space for
        # a whole block is allocated already, so their writes need no room.
        self._preallocated: set[str] = set()
        self._doomed: set[str] = set()  # discarded while sealed: dropped when retired
        # Uploaded blocks whose checksums the metadata's open transaction records: each
        # keeps its file until that is committed (`committed`), and their dirty length.
        self.awaiting_commit: list[str] = []
        self.awaiting_bytes = 0
        self._room = trio.Event()  # set when dirty data falls below the limit

    def _set_length(self, block_id: str, length: int) -> None:
        self.dirty_bytes += length - self.lengths.get(block_id, 0)
        self.lengths[block_id] = length

    def create(self, content: bytes = b"") -> str:
        """Create a writable dirty block holding `content`; return its new id."""
        block_id, fd = self.files.take_empty()
        if fd >= 0:
            self.files.keep_fd(block_id, fd)
        else:
            fd = self.files.fd(block_id)
        try:
            if content:
                pwrite_all(fd, content, 0)
        except BaseException:  # a full disk: leave no unaccounted file behind
            self.files.close_fd(block_id)
            self.files.path(block_id).unlink(missing_ok=True)
            raise
        self.space.wrote(len(content))
        self.dirty_bytes += len(content)
        self.lengths[block_id] = len(content)
        self._since[block_id] = time.monotonic()
        self.unsynced[block_id] = [(0, len(content))] if content else []
        return block_id

    def adopt(self, block_id: str, path: Path) -> str:
        """Create a writable, empty dirty block from a reservation's file at `path`."""
        self.files.adopt(block_id, path)
        self.lengths[block_id] = 0
        self._since[block_id] = time.monotonic()
        self.unsynced[block_id] = []
        self._preallocated.add(block_id)
        return block_id

    def is_preallocated(self, block_id: str) -> bool:
        """Whether writes to the block land in space the disk has given already."""
        return block_id in self._preallocated and block_id not in self._sealed

    async def copy(self, block_id: str) -> str | None:
        """Create a writable dirty block holding a copy of block `block_id` (copy on write);
        None if no local copy of it exists (the caller downloads it and uses `create`).

        The kernel copies (copy_file_range) in a worker thread: a 4 KiB write to an uploaded
        or sealed 1 MiB block used to read and write 1 MiB in the trio thread, which every
        other request waited for. The new block joins the dirty set only once complete, so no
        seal can freeze it half copied.

        The copy is fdatasynced before it is returned: the metadata commit that names it
        may reach the disk before its bytes otherwise, and a machine crash would then lose
        the block's old content, fsynced or uploaded, too (docs/faults.md). One fdatasync per
        copy, in the worker trip the copy makes anyway.
        """
        files = self.files
        src = os.dup(files.fd(block_id)) if block_id in self.lengths else None  # sealed: stable
        if src is not None:
            files.copying.add(block_id)  # its file must not be recycled under the copy
        new_id, new_fd = files.take_empty()

        def copy_into(fd: int) -> int | None:
            if src is not None:
                return copy_all(src, fd)
            f = self.clean.open(block_id)
            if f is None:
                return None
            if isinstance(f, bytes):  # diskcache keeps small values inline
                pwrite_all(fd, f, 0)
                return len(f)
            with f:
                return copy_all(f.fileno(), fd)

        def work() -> tuple[int, int | None]:
            fd = new_fd
            if fd < 0:
                fd = os.open(files.path(new_id), os.O_RDWR | os.O_CREAT, 0o600)  # maybe recycled
            try:
                length = copy_into(fd)
                if length is not None:
                    os.fdatasync(fd)
                return fd, length
            except BaseException:  # a full disk: leave no unaccounted file behind
                os.close(fd)
                files.path(new_id).unlink(missing_ok=True)
                raise

        try:
            fd, length = await trio.to_thread.run_sync(work, limiter=self.local_limiter)
        finally:
            if src is not None:
                os.close(src)
                files.copying.discard(block_id)
        if length is None:  # not cached: the file stays empty, ready for the next block
            files.give_back_empty(new_id, fd)
            return None
        files.keep_fd(new_id, fd)
        self.space.wrote(length)
        self._set_length(new_id, length)
        self._since[new_id] = time.monotonic()
        return new_id

    async def create_synced(self, content: bytes) -> str:
        """`create(content)`, fdatasynced before anyone names it: for copies of durable data
        that did not come from a local file (see `copy`), such as a cut tail block."""
        block_id = self.create(content)
        try:
            fd = os.dup(self.files.fd(block_id))
            try:
                await trio.to_thread.run_sync(os.fdatasync, fd, limiter=self.local_limiter)
            finally:
                os.close(fd)
        except BaseException:
            self.discard(block_id)
            raise
        self.unsynced.pop(block_id, None)
        return block_id

    def is_writable(self, block_id: str) -> bool:
        return block_id in self.lengths and block_id not in self._sealed

    def write(self, block_id: str, offset: int, data: bytes) -> None:
        """Write into a writable dirty block (the caller checked `is_writable`)."""
        fd = self.files.fds.get(block_id)
        if fd is None:
            fd = self.files.fd(block_id)
        ranges = self.unsynced.get(block_id)
        if ranges is None:
            self.unsynced[block_id] = [(offset, offset + len(data))]
        elif len(ranges) < MAX_RANGES:
            ranges.append((offset, offset + len(data)))
        else:  # many small writes since the last fsync: one range covering them all
            ranges[:] = [(min(offset, *(r[0] for r in ranges)),
                          max(offset + len(data), *(r[1] for r in ranges)))]
        self.space.wrote(len(data))
        try:
            pwrite_all(fd, data, offset)
        except OSError:
            # Failed half-way (a full disk): the file may have grown; count what is there.
            size = os.fstat(fd).st_size
            if size > self.lengths[block_id]:
                self._set_length(block_id, size)
            raise
        end = offset + len(data)
        if end > self.lengths[block_id]:
            self._set_length(block_id, end)

    def discard(self, block_id: str) -> bool:
        """Forget a block the metadata no longer references.

        Returns True when the store may hold its object (so it is garbage to collect once a
        checkpoint without it is published).
        """
        if block_id not in self.lengths:
            self.clean.discard(block_id)
            return True
        if block_id in self._sealed:
            self._doomed.add(block_id)  # its upload is running: delete when the cycle ends
            return True
        self._drop(block_id)
        return False

    def take_back(self, referenced: Callable[[str], bool]) -> None:
        """After a rollback (a handler's savepoint, or SQLite's own of the whole group on a
        full disk): a block discarded since the last commit whose reference came back with
        the rollback is a dirty block again, not a file to delete once the next commit runs.
        `referenced(id)`: the metadata names the block without a checksum."""
        self._doomed = {b for b in self._doomed if not referenced(b)}
        for block_id, length in self.files.take_back(referenced):
            self._set_length(block_id, length)
            self._since[block_id] = time.monotonic()
            self.unsynced[block_id] = [(0, length)]  # the next fsync syncs it whole
            self.journal.hold_again(block_id)  # its fsynced bytes may be in the journal only
            log.warning("a rolled-back change keeps block %s", block_id)

    def _drop(self, block_id: str, synced_after: int | None = None) -> None:
        """Forget a dirty block; its file is held until it may go (`DirtyFiles.hold`)."""
        self.files.hold(block_id, synced_after)
        self._preallocated.discard(block_id)
        self.dirty_bytes -= self.lengths.pop(block_id)
        self._since.pop(block_id, None)
        self.unsynced.pop(block_id, None)
        self.journal.let_go(block_id)
        self._wake_writers()

    def recover(self) -> list[str]:
        """Register the dirty blocks left on disk by an earlier run (after the journal's
        replay); return their ids."""
        found = []
        for p in self.files.dir.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink()
                continue
            size = p.stat().st_size
            self._set_length(p.name, size)
            self._since[p.name] = 0.0
            self.unsynced[p.name] = [(0, size)]  # maybe only in a killed daemon's page cache
            found.append(p.name)
        return found

    # -- the upload cycle (driven by the sync layer) ---------------------------------------

    def seal_all(self) -> list[str]:
        """Freeze every dirty block for upload; later writes to them go to new blocks."""
        ids = [b for b in self.lengths if b not in self._sealed]
        self._sealed.update(ids)
        self._preallocated.clear()  # a write to a sealed block goes to a copy
        return ids

    def retire(self, block_id: str, uploaded_at: int | None) -> None:
        """End a sealed block's cycle: dropped if uploaded (its clean copy serves reads; its
        file goes once a sync covers `uploaded_at`, the commit of its checksum) or discarded
        meanwhile, else writable again."""
        self._sealed.discard(block_id)
        if block_id in self._doomed:
            self._doomed.discard(block_id)
            self._drop(block_id)
        elif uploaded_at is not None:
            self._drop(block_id, synced_after=uploaded_at)

    def uploaded(self, block_ids: list[str]) -> None:
        """Sealed blocks are in the store, and the metadata recorded their checksums in its
        open transaction: each is retired once that is committed (`committed`). Not before:
        a crash in between would leave the metadata naming a block with neither a checksum
        nor a local copy (tests/test_crash.py found it). Batched: one commit per tick."""
        self.awaiting_commit.extend(block_ids)
        self.awaiting_bytes += sum(self.lengths.get(b, 0) for b in block_ids)

    def committed(self, commit: int, awaits_upload: Callable[[str], bool]) -> None:
        """After metadata commit number `commit`: retire the uploaded blocks whose state it
        made durable.

        Checked, not assumed: if an earlier commit failed and SQLite rolled it back (a full
        disk), a block's checksum may be gone (`awaits_upload(id)`), and the block must then
        be uploaded again.
        """
        for block_id in self.awaiting_commit:
            if awaits_upload(block_id):  # its checksum's commit was rolled back
                self.clean.forget(block_id)  # written again: its copy gets stale
                self.retire(block_id, None)
            else:
                self.retire(block_id, commit)
        self.awaiting_commit.clear()
        self.awaiting_bytes = 0

    def is_doomed(self, block_id: str) -> bool:
        """Whether a sealed block was discarded while its upload ran."""
        return block_id in self._doomed

    # -- backpressure ----------------------------------------------------------------------

    def oldest_dirty_age(self) -> float:
        if not self._since:
            return 0.0
        return time.monotonic() - min(self._since.values())

    async def wait_below_limit(self) -> None:
        """Block a writer while dirty data is over the hard limit: it waits, never fails."""
        while self.dirty_bytes > self.dirty_limit:
            await self._room.wait()

    def _wake_writers(self) -> None:
        if self.dirty_bytes <= self.dirty_limit:
            self._room.set()
            self._room = trio.Event()

    def space_coming(self) -> bool:
        """Whether dropped blocks are about to free disk space (a full disk waits for it)."""
        return self.files.space_coming()
