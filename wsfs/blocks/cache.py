"""The block cache: dirty blocks (local files, never evicted), the cache disk's space, and
uploads; clean copies and downloads are clean.py's.

This layer knows blocks by id and nothing else: no inodes, no paths, no metadata. A block id
names a local file `dirty/<id>` while the block is dirty, and once uploaded either the
immutable object `data/<id[:2]>/<id>` or a member of a pack (pack.py) stored the same way
under the pack's id. A block's content is at most one block long; a shorter
block reads as if padded with zeros (holes inside a block, and the tail of a file).

A dirty block is *writable* until the sync layer seals it for upload; a sealed block is never
changed again (a write to it goes to a fresh copy), so an upload reads a stable snapshot
without locks. Writes are plain pwrite(2) into the page cache: a crash of the daemon loses
nothing, and fsync(2) of a file fsyncs its dirty blocks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from ..store import ObjectStore
from . import pack as packs
from .clean import CleanCache
from .files import checksum, copy_all, object_key, pwrite_all
from .journal import FSYNC_MAX, GROW, Journal

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
# Empty dirty files kept ready: creating a file costs ~0.1-1 ms of the FUSE thread, and a
# burst of new small files (tar, git checkout) drained a pool of 64 in a tenth of a second.
POOL_SIZE = 256
# The files of dropped dirty blocks are emptied and renamed into the pool instead of deleted,
# up to this many: on the ext4 of our hosts creating a file costs ~150-200 us of CPU, emptying
# and renaming one ~10 us, and every new small file needs a block file (tar and git add of
# a package tree created thousands, in a worker thread that took the CPU from the FUSE thread).
POOL_MAX = 4096
MAX_OPEN_FILES = 256
MAX_RANGES = 64  # ranges written since an fsync kept per block; more are merged into one
# Threads for the local disk work of FUSE requests (fsync(2)s, copies on write). The fsync(2)s
# of one file's blocks run in parallel: each waits mostly on the disk's cache flush, and
# concurrent flushes share one (jbd2 and the block layer batch them).
LOCAL_THREADS = 16
# Packs being uploaded at once. Each holds its members, the pack built from them and the
# HTTP client's buffers (~12 MiB for a full pack): with the store's 32 threads all on packs,
# a flush of 256 MiB peaked at 300 MB of RSS. Eight keep a store that answers in 50 ms
# busy at ~600 MB/s.
PACK_UPLOADS = 8
# A writer's check for free disk space uses an estimate (the last statvfs(2) minus the bytes
# written since) while it is younger than this many seconds and more than FREE_MARGIN above
# what the writer needs; otherwise it asks the disk again. statvfs(2) on every write was a
# third of the cost of a small file's write request.
FREE_REFRESH = 0.05
FREE_MARGIN = 64 << 20
# Bytes a write is counted as taking from the estimate beyond its length: a new file's first
# allocation (a 100-byte file takes a 4 KiB block), so the estimate never runs ahead of the disk.
ALLOC_SLACK = 4096


class BlockCache:
    """Local storage of blocks, and their transfer to and from the object store."""

    def __init__(
        self,
        cache_dir: Path,
        store: ObjectStore,
        *,
        block_size: int,
        cache_size: int,
        dirty_limit: int,
        limiter: trio.CapacityLimiter,
        read_timeout: float = 60.0,
        full_timeout: float = 60.0,
    ) -> None:
        """`read_timeout`: seconds a download may retry an unreachable store before the read
        fails (EIO). `full_timeout`: seconds a writer waits on a full cache disk without any
        space being freed before it gets ENOSPC."""
        self.store = store
        self.block_size = block_size
        self.dirty_limit = dirty_limit
        self.limiter = limiter
        self._pack_uploads = trio.CapacityLimiter(PACK_UPLOADS)
        # Requests have their own threads: a caller of fsync(2) must never queue behind uploads.
        self.local_limiter = trio.CapacityLimiter(LOCAL_THREADS)
        self.full_timeout = full_timeout
        self.reserve = MIN_RESERVE
        self.on_full: Callable[[], None] | None = None  # asks the sync layer to flush now
        self._disk_full_since: float | None = None  # a writer got ENOSPC; no space since
        self.ballast = cache_dir / "ballast"
        self.dirty_dir = cache_dir / "dirty"
        self.dirty_dir.mkdir(parents=True, exist_ok=True)
        self.clean = CleanCache(cache_dir / "clean", store, block_size=block_size,
                                size_limit=cache_size, limiter=limiter,
                                read_timeout=read_timeout)
        self._dirty: dict[str, int] = {}  # id -> length of the local file
        self._dirty_since: dict[str, float] = {}  # id -> monotonic time it became dirty
        self._sealed: set[str] = set()
        # Dirty blocks written since their last fsync(2), with the ranges written (start,
        # end), and those being fsynced right now (an event set when that fsync(2) ends):
        # fsync skips blocks already on the disk, and journals small ranges (journal.py).
        self._unsynced: dict[str, list[tuple[int, int]]] = {}
        self._syncing: dict[str, trio.Event] = {}
        self.journal = Journal(cache_dir / "journal")
        self._journal_ready = False  # appends only once `recover` has replayed it
        self._journal_lock = trio.Lock()  # an epoch's end keeps appends out (rule 3)
        self._journal_drops = 0  # held blocks dropped so far
        self._dropped_live: set[str] = set()  # ... this epoch: `take_back` may restore them
        # Makes every metadata change durable (set by the fs layer): an epoch's end waits
        # for it. Without it fsync syncs the blocks' files.
        self.durable_metadata: Callable[[], Awaitable[None]] | None = None
        self._doomed: set[str] = set()
        # Files of blocks let go of (id, and the fd still open on it or -1): kept until the
        # metadata change that lets them go is committed, then until a sync of the metadata
        # makes that commit durable (a machine crash must not bring back metadata naming a
        # block whose file is gone), then closed and deleted in batches by `maintain` in a
        # worker thread (never in the FUSE thread).
        self._unlink_after_commit: list[tuple[str, int]] = []
        self._unlink_after_sync: list[tuple[int, str, int]] = []  # (commit, id, fd)
        self._unlink_ready: list[tuple[str, int]] = []
        # The number of metadata commits made durable so far (set by the flusher): files
        # waiting for a commit up to it may go.
        self.synced_commits: Callable[[], int] | None = None
        # The free-space estimate of `wait_for_room`: statvfs(2)'s answer, when it was asked
        # (monotonic seconds), and the bytes written into dirty blocks since.
        self._free_seen = 0
        self._free_seen_at = -FREE_REFRESH
        self._written_since = 0
        # Empty files made ahead of need by `maintain`: creating a file costs the FUSE thread
        # more than writing it, and a new small file needs one.
        self._pool: list[tuple[str, int]] = []  # (id, open fd)
        # Recycled files beyond what the pool holds open (POOL_MAX): ids of empty files.
        self._spare: list[str] = []
        # Dirty blocks a copy on write is reading in a worker thread: their files are deleted,
        # never recycled, when they are dropped meanwhile (a recycled file changes content).
        self._copying: set[str] = set()
        self._fds: dict[str, int] = {}
        self._room = trio.Event()
        self.dirty_bytes = 0
        self.hits = 0
        self.misses = 0

    # -- dirty blocks ----------------------------------------------------------------------

    def _path(self, block_id: str) -> Path:
        return self.dirty_dir / block_id

    def _fd(self, block_id: str) -> int:
        fd = self._fds.get(block_id)
        if fd is None:
            path = self._path(block_id)
            try:  # O_CREAT only when needed: it locks the directory the pool work renames in
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self._keep_fd(block_id, fd)
        return fd

    def _keep_fd(self, block_id: str, fd: int) -> None:
        if len(self._fds) >= MAX_OPEN_FILES:  # close the least recently opened
            os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[block_id] = fd

    def _close(self, block_id: str) -> None:
        fd = self._fds.pop(block_id, None)
        if fd is not None:
            os.close(fd)

    def _set_length(self, block_id: str, length: int) -> None:
        self.dirty_bytes += length - self._dirty.get(block_id, 0)
        self._dirty[block_id] = length

    def create(self, content: bytes = b"") -> str:
        """Create a writable dirty block holding `content`; return its new id."""
        if self._pool:
            block_id, fd = self._pool.pop()
            self._keep_fd(block_id, fd)
        elif self._spare:
            block_id = self._spare.pop()
            fd = self._fd(block_id)
        else:
            block_id = secrets.token_hex(16)
            fd = self._fd(block_id)
        try:
            if content:
                pwrite_all(fd, content, 0)
        except BaseException:  # a full disk: leave no unaccounted file behind
            self._close(block_id)
            self._path(block_id).unlink(missing_ok=True)
            raise
        self._written_since += len(content) + ALLOC_SLACK
        self.dirty_bytes += len(content)
        self._dirty[block_id] = len(content)
        self._dirty_since[block_id] = time.monotonic()
        self._unsynced[block_id] = [(0, len(content))] if content else []
        return block_id

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
        src = os.dup(self._fd(block_id)) if block_id in self._dirty else None  # sealed: stable
        if src is not None:
            self._copying.add(block_id)  # its file must not be recycled under the copy
        if self._pool:
            new_id, new_fd = self._pool.pop()
        else:
            new_id, new_fd = self._spare.pop() if self._spare else secrets.token_hex(16), -1

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
                fd = os.open(self._path(new_id), os.O_RDWR | os.O_CREAT, 0o600)  # maybe recycled
            try:
                length = copy_into(fd)
                if length is not None:
                    os.fdatasync(fd)
                return fd, length
            except BaseException:  # a full disk: leave no unaccounted file behind
                os.close(fd)
                self._path(new_id).unlink(missing_ok=True)
                raise

        try:
            fd, length = await trio.to_thread.run_sync(work, limiter=self.local_limiter)
        finally:
            if src is not None:
                os.close(src)
                self._copying.discard(block_id)
        if length is None:  # not cached: the file stays empty, ready for the next block
            self._pool.append((new_id, fd))
            return None
        self._keep_fd(new_id, fd)
        self._written_since += length + ALLOC_SLACK
        self._set_length(new_id, length)
        self._dirty_since[new_id] = time.monotonic()
        return new_id

    async def create_synced(self, content: bytes) -> str:
        """`create(content)`, fdatasynced before anyone names it: for copies of durable data
        that did not come from a local file (see `copy`), such as a cut tail block."""
        block_id = self.create(content)
        try:
            fd = os.dup(self._fd(block_id))
            try:
                await trio.to_thread.run_sync(os.fdatasync, fd, limiter=self.local_limiter)
            finally:
                os.close(fd)
        except BaseException:
            self.discard(block_id)
            raise
        self._unsynced.pop(block_id, None)
        return block_id

    def is_writable(self, block_id: str) -> bool:
        return block_id in self._dirty and block_id not in self._sealed

    def write(self, block_id: str, offset: int, data: bytes) -> None:
        """Write into a writable dirty block (the caller checked `is_writable`)."""
        fd = self._fds.get(block_id)
        if fd is None:
            fd = self._fd(block_id)
        ranges = self._unsynced.get(block_id)
        if ranges is None:
            self._unsynced[block_id] = [(offset, offset + len(data))]
        elif len(ranges) < MAX_RANGES:
            ranges.append((offset, offset + len(data)))
        else:  # many small writes since the last fsync: one range covering them all
            ranges[:] = [(min(offset, *(r[0] for r in ranges)),
                          max(offset + len(data), *(r[1] for r in ranges)))]
        self._written_since += len(data) + ALLOC_SLACK
        try:
            pwrite_all(fd, data, offset)
        except OSError:
            # Failed half-way (a full disk): the file may have grown; count what is there.
            size = os.fstat(fd).st_size
            if size > self._dirty[block_id]:
                self._set_length(block_id, size)
            raise
        end = offset + len(data)
        if end > self._dirty[block_id]:
            self._set_length(block_id, end)

    def discard(self, block_id: str) -> bool:
        """Forget a block the metadata no longer references.

        Returns True when the store may hold its object (so it is garbage to collect once a
        checkpoint without it is published).
        """
        if block_id not in self._dirty:
            self.clean.discard(block_id)
            return True
        if block_id in self._sealed:
            self._doomed.add(block_id)  # its upload is running: delete when the cycle ends
            return True
        self._drop_dirty(block_id)
        return False

    def take_back(self, referenced: Callable[[str], bool]) -> None:
        """After a rollback (a handler's savepoint, or SQLite's own of the whole group on a
        full disk): a block discarded since the last commit whose reference came back with
        the rollback is a dirty block again, not a file to delete once the next commit runs.
        `referenced(id)`: the metadata names the block without a checksum."""
        self._doomed = {b for b in self._doomed if not referenced(b)}
        gone = []
        for block_id, fd in self._unlink_after_commit:
            if not referenced(block_id):
                gone.append((block_id, fd))
                continue
            try:
                length = os.stat(self._path(block_id)).st_size
            except OSError as e:  # (a hook after a rollback must not fail in its turn)
                log.error("cannot take back block %s: %s", block_id, e)
                gone.append((block_id, fd))
                continue
            if fd >= 0:
                self._keep_fd(block_id, fd)
            self._set_length(block_id, length)
            self._dirty_since[block_id] = time.monotonic()
            self._unsynced[block_id] = [(0, length)]  # the next fsync syncs it whole
            if block_id in self._dropped_live:  # its fsynced bytes may be in the journal only
                self.journal.live.add(block_id)
            log.warning("a rolled-back change keeps block %s", block_id)
        self._unlink_after_commit = gone

    def release_discarded(self, commit: int) -> None:
        """Let go of the files of blocks discarded before the metadata commit that just ran
        (number `commit`), once that commit is durable.

        A discarded block's file outlives the transaction that dropped its reference: if the
        daemon dies before that commit, the metadata that comes back still names the block,
        and its data must still be there; if the machine dies before the commit reached the
        disk, the same (called by the metadata's commit hook).
        """
        self._unlink_after_sync.extend((commit, b, fd) for b, fd in self._unlink_after_commit)
        self._unlink_after_commit.clear()

    def _release_synced(self) -> None:
        """Move the files whose commit a metadata sync has made durable to the deletions."""
        if not self._unlink_after_sync:
            return
        synced = self.synced_commits() if self.synced_commits is not None else None
        keep = []
        for entry in self._unlink_after_sync:
            if synced is None or entry[0] <= synced:
                self._unlink_ready.append(entry[1:])
            else:
                keep.append(entry)
        self._unlink_after_sync = keep

    def awaiting_sync(self) -> bool:
        """Whether files wait for a metadata sync before they can go (the flusher then syncs
        soon: on a full disk, writers wait for that space)."""
        return bool(self._unlink_after_sync)

    def make_commit_room(self) -> None:
        """Before a metadata commit: if the disk is nearly full, give up the ballast."""
        if self.disk_free() < BALLAST and self.ballast.exists():
            log.warning("the cache disk is full: releasing its %d MiB ballast for the metadata",
                        BALLAST >> 20)
            self.ballast.unlink(missing_ok=True)

    def _keep_ballast(self) -> None:
        """(Re)create the ballast once there is room for it beside the reserve (blocking)."""
        if not self.ballast.exists() and self.disk_free() > self.reserve + 4 * BALLAST:
            tmp = self.ballast.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, BALLAST)
            tmp.replace(self.ballast)

    def space_coming(self) -> bool:
        """Whether deleted blocks are about to free disk space (a full disk waits for it)."""
        return bool(self._unlink_after_commit or self._unlink_after_sync or self._unlink_ready)

    async def maintain(self) -> None:
        """Background upkeep in worker threads: delete released files and the clean copies
        of discarded blocks, refill the pool."""
        while True:
            self._release_synced()
            doomed, self._unlink_ready = self._unlink_ready, []
            gone = self.clean.take_discarded()
            room = max(0, POOL_MAX - len(self._spare))
            reuse = [d for d in doomed if d[0] not in self._copying][:room]
            if reuse:
                taken = {d[0] for d in reuse}
                doomed = [d for d in doomed if d[0] not in taken]
            # open files the pool wants: spare files first, then recycled ones, then new ones
            want = POOL_SIZE - len(self._pool) if len(self._pool) < POOL_SIZE * 3 // 4 else 0
            cut = max(0, len(self._spare) - want)
            reopen, self._spare = self._spare[cut:], self._spare[:cut]

            def work(doomed: list[tuple[str, int]] = doomed, reuse: list[tuple[str, int]] = reuse,
                     reopen: list[str] = reopen, want: int = want, gone: list[str] = gone
                     ) -> tuple[list[tuple[str, int]], list[str]]:
                self.clean.delete(gone)
                ids = reopen + self._recycle_files(reuse)
                made: list[tuple[str, int]] = []
                for block_id in ids[:want]:
                    with contextlib.suppress(FileNotFoundError):
                        made.append((block_id, os.open(self._path(block_id), os.O_RDWR)))
                self._unlink_files(doomed)
                with contextlib.suppress(OSError):
                    self._keep_ballast()
                try:
                    for _ in range(want - len(made)):
                        block_id = secrets.token_hex(16)
                        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
                        made.append((block_id, os.open(self._path(block_id), flags, 0o600)))
                except OSError as e:  # a full disk: keep what is made, writers make their own
                    log.debug("cannot prepare dirty files: %s", e)
                return made, ids[want:]

            if doomed or reuse or want or gone or not self.ballast.exists():
                try:  # not behind uploads: a pool refilled late is a pool drained
                    made, spare = await trio.to_thread.run_sync(work, limiter=self.local_limiter)
                    self._pool.extend(made)
                    self._spare.extend(spare)
                except OSError as e:  # a full disk: writers create their own files
                    log.debug("cannot prepare dirty files: %s", e)
                    want = 0
            await trio.sleep(0.01 if want else 0.05)  # a draining pool is refilled soon

    def _recycle_files(self, doomed: list[tuple[str, int]]) -> list[str]:
        """Empty the files of dropped blocks and rename them to fresh ids (blocking): pool
        entries for new blocks at a fraction of the cost of new files (POOL_MAX). A crash
        halfway leaves an empty file that nothing references: recovery deletes it.

        The file is emptied through an fd that is closed after: ext4 flushes a file emptied
        by truncate at its next close (auto_da_alloc), which is cheap here and cost the FUSE
        thread ~60 us at the close after the file's reuse."""
        base = str(self.dirty_dir) + os.sep
        made = []
        for block_id, fd in doomed:
            new_id = secrets.token_hex(16)
            try:
                if fd < 0:
                    fd = os.open(base + block_id, os.O_RDWR)
                os.ftruncate(fd, 0)
                os.rename(base + block_id, base + new_id)
                made.append(new_id)
            except FileNotFoundError:
                pass
            except OSError:  # not worth a failure: delete it as before
                with contextlib.suppress(OSError):
                    os.unlink(base + block_id)
            finally:
                if fd >= 0:
                    os.close(fd)
        return made

    def _unlink_files(self, doomed: list[tuple[str, int]]) -> None:
        """Close and delete the files of dropped blocks (blocking)."""
        base = str(self.dirty_dir) + os.sep
        for block_id, fd in doomed:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + block_id)

    def is_doomed(self, block_id: str) -> bool:
        """Whether a sealed block was discarded while its upload ran."""
        return block_id in self._doomed

    def _drop_dirty(self, block_id: str, synced_after: int | None = None) -> None:
        """Forget a dirty block; its file is closed and deleted later in a worker thread
        (closing the last fd of a file is part of what made a delete cost the FUSE thread):
        after the next commit and its sync, or with `synced_after`, after a sync of the
        metadata covering that commit."""
        fd = self._fds.pop(block_id, -1)
        if fd >= 0 and len(self._unlink_after_commit) + len(self._unlink_after_sync) \
                >= MAX_OPEN_FILES:  # many deletes between two syncs
            os.close(fd)
            fd = -1
        if synced_after is None:
            self._unlink_after_commit.append((block_id, fd))
        else:
            self._unlink_after_sync.append((synced_after, block_id, fd))
        self.dirty_bytes -= self._dirty.pop(block_id)
        self._dirty_since.pop(block_id, None)
        self._unsynced.pop(block_id, None)
        if block_id in self.journal.live:  # see `_restart_journal`
            self.journal.live.discard(block_id)
            self._dropped_live.add(block_id)
            self._journal_drops += 1
        self._wake_writers()

    async def fsync(self, block_ids: list[str], also: Callable[[], None] | None = None) -> None:
        """Make the given dirty blocks durable on the local disk.

        Only blocks written since their last fsync(2) are synced again (a random writer of a
        big file touches a few of its blocks between two fsyncs). A block whose fsync(2)
        another caller is running is waited for: its return is what makes it durable.
        `also` is a blocking job run in parallel (the metadata's sync), so that a caller
        waits for one round of disk flushes, not two. Up to FSYNC_MAX new bytes go into the
        journal (journal.py), synced once; more, and the blocks' own files are synced.
        """
        while True:
            running = [self._syncing[b] for b in block_ids if b in self._syncing]
            if not running:
                break
            for event in running:
                await event.wait()
        todo = {b: self._unsynced.pop(b) for b in block_ids
                if b in self._unsynced and b in self._dirty}  # a write from now on marks it again
        if not todo and also is None:
            return
        done = trio.Event()
        for b in todo:
            self._syncing[b] = done
        ok = False
        try:
            if not await self._journal_fsync(todo, also):
                await self._files_fsync(list(todo), also)
            ok = True
        finally:
            for b, ranges in todo.items():
                del self._syncing[b]
                if not ok and b in self._dirty:
                    self._unsynced.setdefault(b, []).extend(ranges)
            done.set()

    async def _journal_fsync(self, todo: dict[str, list[tuple[int, int]]],
                             also: Callable[[], None] | None) -> bool:
        """fsync by the journal: append the written ranges, sync it (and `also`) once.
        False if this fsync is not for the journal (too big, full, not ready, a full disk)."""
        journal = self.journal
        if not todo or not self._journal_ready or self.durable_metadata is None:
            return False
        ranges = {b: _merged(r) for b, r in todo.items()}
        size = sum(end - start for rs in ranges.values() for start, end in rs)
        if size > FSYNC_MAX:
            return False
        async with self._journal_lock:
            if journal.has_records and not journal.live:
                await self._restart_journal()  # rule 3: none of its blocks is dirty
            count = sum(len(rs) for rs in ranges.values())
            if not journal.fits(count, size):
                return False
            if journal.grows(count, size) and self.disk_free() < self.reserve + GROW:
                return False  # its growth would eat the metadata's reserve on the cache disk
            records = [(b, start, os.pread(self._fd(b), end - start, start))
                       for b, rs in ranges.items() for start, end in rs]
            try:
                journal.append(records)
            except OSError as e:
                log.debug("cannot append to the data journal: %s", e)
                return False
        await self._run_parallel([journal.sync] if also is None else [journal.sync, also])
        return True

    async def _files_fsync(self, todo: list[str], also: Callable[[], None] | None) -> None:
        """fsync by the blocks' own files, all in parallel with `also`. A block the journal
        holds ends the journal's epoch (rule 2): every block it holds is synced, then the
        new epoch is made durable."""
        journal = self.journal
        if not journal.live.intersection(todo):
            await self._sync_files(todo, also)
            return
        async with self._journal_lock:
            held = [b for b in journal.live if b not in todo]  # (all dirty: `_drop_dirty`)
            await self._sync_files(todo + held, also)
            await self._restart_journal()
            await self._run_parallel([journal.sync])

    async def _restart_journal(self) -> None:
        """End the journal's epoch (holding `_journal_lock`): first every metadata change
        is made durable, so a block the journal stopped holding because it was dropped stays
        dropped after a crash (else its data would be gone and the metadata still name it)."""
        assert self.durable_metadata is not None
        while True:
            drops = self._journal_drops
            await self.durable_metadata()
            if drops == self._journal_drops:  # no held block was dropped meanwhile
                break
        self.journal.restart()
        self._dropped_live.clear()

    async def _sync_files(self, block_ids: list[str], also: Callable[[], None] | None) -> None:
        # Duplicates: the trio thread may close a block's fd while the worker fsyncs it (an
        # upload retiring the block, or the fd LRU), which made fsync(2) fail with EBADF.
        fds = [os.dup(self._fd(b)) for b in block_ids]
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

    def recover(self, wanted: Callable[[str], bool] = lambda _: True) -> list[str]:
        """Replay the data journal into the blocks that are `wanted` (the metadata awaits
        their upload), then register the dirty blocks left on disk by an earlier run;
        return their ids."""
        self.journal.replay(self.dirty_dir, wanted)
        self._journal_ready = True
        found = []
        for p in self.dirty_dir.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink()
                continue
            size = p.stat().st_size
            self._set_length(p.name, size)
            self._dirty_since[p.name] = 0.0
            self._unsynced[p.name] = [(0, size)]  # maybe only in a killed daemon's page cache
            found.append(p.name)
        return found

    # -- backpressure ----------------------------------------------------------------------

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def dirty_length(self, block_id: str) -> int:
        """The local length of a dirty block (0 if it is not dirty): for upload figures."""
        return self._dirty.get(block_id, 0)

    def oldest_dirty_age(self) -> float:
        if not self._dirty_since:
            return 0.0
        return time.monotonic() - min(self._dirty_since.values())

    async def wait_for_room(self, size: int = 0) -> None:
        """Block a writer while dirty data is over the hard limit or the cache disk is full.

        Over the dirty limit writers wait, they never fail. On a full disk they wait while
        clean blocks are evicted and uploads free dirty ones; only when no space has been
        freed for `full_timeout` seconds (the disk is full of dirty data that cannot be
        uploaded) does the write fail with ENOSPC, and later writes fail at once until space
        is freed.
        """
        while self.dirty_bytes > self.dirty_limit:
            await self._room.wait()
        need = self._needed(size)
        if self._free_estimate(need) >= need:
            self._disk_full_since = None
            return
        await self._wait_for_disk(size)

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

    def disk_free(self) -> int:
        st = os.statvfs(self.dirty_dir)
        return st.f_bavail * st.f_frsize

    def _needed(self, size: int) -> int:
        # A write may also copy a whole block (copy on write) before writing into it.
        return self.reserve + size + 2 * self.block_size

    def room_to_keep(self, size: int) -> bool:
        """Whether a clean copy of `size` bytes fits without eating into the writers' room."""
        return self.disk_free() >= self._needed(size)

    async def _wait_for_disk(self, size: int) -> None:
        need = self._needed(size)
        await self.clean.evict(need - self.disk_free())
        if self.disk_free() >= need:
            return
        if self._disk_full_since is not None and not self.space_coming():
            raise OSError(errno.ENOSPC, "the cache disk is full of dirty data")
        log.warning("the cache disk is full (%d bytes free, %d dirty): writers wait for uploads",
                    self.disk_free(), self.dirty_bytes)
        if self.on_full is not None:
            self.on_full()
        last_free, last_dirty = self.disk_free(), self.dirty_bytes
        last_progress = trio.current_time()
        while True:
            await trio.sleep(0.1)
            free = self.disk_free()
            if free >= need:
                self._disk_full_since = None
                return
            if free > last_free or self.dirty_bytes < last_dirty:
                last_progress = trio.current_time()
            last_free, last_dirty = free, self.dirty_bytes
            # another writer already gave up (unless deletions are about to free space)
            if self._disk_full_since is not None and not self.space_coming():
                raise OSError(errno.ENOSPC, "the cache disk is full of dirty data")
            if trio.current_time() - last_progress > self.full_timeout:
                self._disk_full_since = trio.current_time()
                log.error("the cache disk is full of dirty data that cannot be uploaded "
                          "(%d bytes dirty): writes fail with ENOSPC until uploads or "
                          "deletions free space", self.dirty_bytes)
                raise OSError(errno.ENOSPC, "the cache disk is full of dirty data")
            await self.clean.evict(need - free)

    def _wake_writers(self) -> None:
        if self.dirty_bytes <= self.dirty_limit:
            self._room.set()
            self._room = trio.Event()

    # -- reading ---------------------------------------------------------------------------

    def read_dirty(self, block_id: str, offset: int, size: int) -> bytes:
        return os.pread(self._fd(block_id), size, offset)

    async def read(self, block_id: str, csum: str | None, pack: str | None, offset: int,
                   size: int) -> bytes:
        """Read up to `size` bytes of a block from `offset` (short at the block's end).

        `csum` and `pack` are what the block map records (see `CleanCache.download`).
        """
        if block_id in self._dirty:
            return self.read_dirty(block_id, offset, size)
        data = self.clean.read(block_id, offset, size)
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        content = await self.clean.download(block_id, csum, pack)
        self.clean.remember(block_id, content)
        return content[offset : offset + size]

    def prefetch(self, nursery: trio.Nursery, block_id: str, csum: str | None,
                 pack: str | None) -> None:
        """Start downloading a block in the background (readahead); errors are left to read."""
        if block_id not in self._dirty:
            self.clean.prefetch(nursery, block_id, csum, pack)

    # -- uploading (driven by the sync layer) ----------------------------------------------

    def seal_all(self) -> list[str]:
        """Freeze every dirty block for upload; later writes to them go to new blocks."""
        ids = [b for b in self._dirty if b not in self._sealed]
        self._sealed.update(ids)
        return ids

    async def upload(self, block_id: str) -> str:
        """Upload a sealed block and keep a clean copy; return its checksum.

        Retries are the caller's business. The clean copy is made from the bytes already in
        memory, so a block is read from disk once however it ends.
        """

        def work() -> str:
            data = self._path(block_id).read_bytes()
            self.store.put(object_key(block_id), data)
            self._keep_uploaded({block_id: data})
            return checksum(data)

        return await trio.to_thread.run_sync(work, limiter=self.limiter)

    async def upload_pack(self, block_ids: list[str]) -> tuple[str, dict[str, str]]:
        """Upload sealed blocks as one pack (see pack.py); return its id and their checksums."""

        def work() -> tuple[str, dict[str, str]]:
            members = [(b, self._path(b).read_bytes()) for b in block_ids]
            blob, csums = packs.build(members)
            pack_id = secrets.token_hex(16)
            self.store.put(object_key(pack_id), blob)
            self._keep_uploaded(dict(members))
            return pack_id, csums

        async with self._pack_uploads:
            return await trio.to_thread.run_sync(work, limiter=self.limiter)

    def _keep_uploaded(self, members: dict[str, bytes]) -> None:
        """Keep clean copies of just-uploaded blocks, unless the cache disk is nearly full:
        there the copies would take the room the uploads are about to free."""
        if self.room_to_keep(sum(len(d) for d in members.values())):
            self.clean.keep(members)

    def retire(self, block_id: str, uploaded_at: int | None) -> None:
        """End a sealed block's cycle: dropped if uploaded (its clean copy serves reads; its
        file goes once a sync covers `uploaded_at`, the commit of its checksum) or discarded
        meanwhile, else writable again."""
        self._sealed.discard(block_id)
        if block_id in self._doomed:
            self._doomed.discard(block_id)
            self._drop_dirty(block_id)
        elif uploaded_at is not None:
            self._drop_dirty(block_id, synced_after=uploaded_at)

    def close(self) -> None:
        self.journal.close()
        for block_id, fd in self._pool:
            os.close(fd)
            self._path(block_id).unlink(missing_ok=True)
        self._pool.clear()
        for block_id in self._spare:
            self._path(block_id).unlink(missing_ok=True)
        self._spare.clear()
        self._release_synced()
        self._unlink_files(self._unlink_ready)
        self._unlink_ready.clear()
        # Their files stay: the commit or its sync did not run (the next mount deletes them).
        for _, fd in self._unlink_after_commit:
            if fd >= 0:
                os.close(fd)
        for _, _, fd in self._unlink_after_sync:
            if fd >= 0:
                os.close(fd)
        self._unlink_after_commit = [(b, -1) for b, _ in self._unlink_after_commit]
        self._unlink_after_sync = [(c, b, -1) for c, b, _ in self._unlink_after_sync]
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.clean.close()


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
