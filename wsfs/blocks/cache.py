"""The block cache: one face for the block layer's parts, so that its callers see one object.

This layer knows blocks by id and nothing else: no inodes, no paths, no metadata. A block id
names a local file `dirty/<id>` while the block is dirty, and once uploaded either the
immutable object `data/<id[:2]>/<id>` or a member of a pack (pack.py) stored the same way
under the pack's id. A block's content is at most one block long; a shorter
block reads as if padded with zeros (holes inside a block, and the tail of a file).

The parts, each with one job, built here in the order they depend on each other:

- clean.py: clean copies and downloads;
- space.py: the cache disk's free space, the metadata's reserve and ballast, writers
  waiting on a full disk;
- dirtyfiles.py: the dirty blocks' files and fds, the pool of empty files, and the files of
  dropped blocks held until a covering sync;
- dirty.py: the dirty pool (writes, copies on write, discards, rollbacks, seals);
- fsync.py: fsync(2) of dirty blocks, through the data journal (journal.py) or their files;
- uploads.py: uploads of sealed blocks and packs;
- reserved.py: room on the disk reserved for blocks not written yet (fallocate(2)).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import trio

from ..store import ObjectStore
from .clean import CleanCache
from .dirty import DirtyBlocks
from .dirtyfiles import DirtyFiles
from .fsync import Fsync, MetadataSync
from .journal import Journal
from .reserved import Reservations
from .space import MIN_RESERVE as MIN_RESERVE  # (the sync layer's floor for `reserve`)
from .space import DiskSpace
from .uploads import Uploads

# Threads for the local disk work of FUSE requests (fsync(2)s, copies on write). The fsync(2)s
# of one file's blocks run in parallel: each waits mostly on the disk's cache flush, and
# concurrent flushes share one (jbd2 and the block layer batch them).
LOCAL_THREADS = 16


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
        self.block_size = block_size
        self.limiter = limiter
        # Requests have their own threads: a caller of fsync(2) must never queue behind uploads.
        self.local_limiter = trio.CapacityLimiter(LOCAL_THREADS)
        dirty_dir = cache_dir / "dirty"
        self.clean = CleanCache(cache_dir / "clean", store, block_size=block_size,
                                size_limit=cache_size, limiter=limiter,
                                read_timeout=read_timeout)
        self.space = DiskSpace(cache_dir, dirty_dir, block_size=block_size, clean=self.clean,
                               full_timeout=full_timeout)
        self.files = DirtyFiles(dirty_dir, space=self.space, clean=self.clean,
                                local_limiter=self.local_limiter)
        self.journal = Journal(cache_dir / "journal")
        self.dirty = DirtyBlocks(self.files, space=self.space, clean=self.clean,
                                 journal=self.journal, dirty_limit=dirty_limit,
                                 local_limiter=self.local_limiter)
        self.fsyncs = Fsync(self.dirty, journal=self.journal, space=self.space,
                            local_limiter=self.local_limiter)
        self.uploads = Uploads(store, files=self.files, clean=self.clean, space=self.space,
                               limiter=limiter)
        self.reservations = Reservations(cache_dir / "reserved")
        self.hits = 0
        self.misses = 0

    # -- what the layers above set (see their modules) -------------------------------------

    @property
    def store(self) -> ObjectStore:
        """The store uploads go to."""
        return self.uploads.store

    @store.setter
    def store(self, store: ObjectStore) -> None:
        self.uploads.store = store

    @property
    def reserve(self) -> int:
        """Free space kept for the metadata (space.py); the sync layer raises it."""
        return self.space.reserve

    @reserve.setter
    def reserve(self, reserve: int) -> None:
        self.space.reserve = reserve

    # -- dirty blocks (dirty.py) -----------------------------------------------------------

    def create(self, content: bytes = b"") -> str:
        return self.dirty.create(content)

    async def copy(self, block_id: str) -> str | None:
        return await self.dirty.copy(block_id)

    def adopt(self, reserved_id: str) -> str:
        """A new writable block made from a reservation (`reserve_room`): no room needed."""
        return self.dirty.adopt(reserved_id, self.reservations.path(reserved_id))

    def is_preallocated(self, block_id: str) -> bool:
        return self.dirty.is_preallocated(block_id)

    async def create_synced(self, content: bytes) -> str:
        return await self.dirty.create_synced(content)

    def is_writable(self, block_id: str) -> bool:
        return self.dirty.is_writable(block_id)

    def write(self, block_id: str, offset: int, data: bytes) -> None:
        self.dirty.write(block_id, offset, data)

    def discard(self, block_id: str) -> bool:
        return self.dirty.discard(block_id)

    def awaiting_sync(self) -> bool:
        return self.files.awaiting_sync()

    async def maintain(self) -> None:
        """Background upkeep, for good: the dirty files' pool, and the retirement of a full
        half of the data journal (fsync.py)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.files.maintain)
            nursery.start_soon(self.fsyncs.retire_older_epochs)

    async def fsync(self, block_ids: list[str], also: Callable[[], None] | None = None,
                    *, also_small: bool = False, metadata: MetadataSync | None = None) -> None:
        await self.fsyncs.fsync(block_ids, also, also_small=also_small, metadata=metadata)

    def recover(self, wanted: Callable[[str], bool] = lambda _: True) -> list[str]:
        """Replay the data journal into the blocks that are `wanted` (the metadata awaits
        their upload), then register the dirty blocks left on disk by an earlier run;
        return their ids."""
        self.fsyncs.replay(wanted)
        return self.dirty.recover()

    # -- backpressure ----------------------------------------------------------------------

    @property
    def dirty_bytes(self) -> int:
        return self.dirty.dirty_bytes

    @property
    def dirty_limit(self) -> int:
        return self.dirty.dirty_limit

    @property
    def dirty_count(self) -> int:
        return len(self.dirty.lengths)

    def dirty_length(self, block_id: str) -> int:
        """The local length of a dirty block (0 if it is not dirty): for upload figures."""
        return self.dirty.lengths.get(block_id, 0)

    def oldest_dirty_age(self) -> float:
        return self.dirty.oldest_dirty_age()

    async def wait_for_room(self, size: int = 0,
                            reserved: Callable[[], bool] | None = None) -> None:
        """Block a writer while dirty data is over the hard limit or the cache disk is full.

        Over the dirty limit writers wait, they never fail. On a full disk they wait while
        clean blocks are evicted and uploads free dirty ones, and may get ENOSPC
        (`DiskSpace.wait_for_disk`), unless `reserved()` says the write lands in room
        reserved for it (`reserve_room`): asked only when the disk looks full.
        """
        await self.dirty.wait_below_limit()
        if not self.space.has_room(size) and not (reserved is not None and reserved()):
            await self.space.wait_for_disk(size, self.dirty)

    async def reserve_room(self, count: int) -> list[str]:
        """Reserve the disk space of `count` blocks for writes to come (reserved.py): ids for
        `adopt` or `release_room`. ENOSPC at once if even evicting every clean copy and uploading
        every dirty block could not make the room; else the wait of `wait_for_room` (not for
        the dirty limit). [] when the disk cannot allocate ahead: the room was there.
        """
        size = count * self.block_size
        if not self.space.could_hold(size, self.clean.volume() + self.dirty.dirty_bytes):
            raise OSError(errno.ENOSPC, "the cache disk cannot hold the range")
        if not self.space.has_room(size):
            await self.space.wait_for_disk(size, self.dirty)
        made = await trio.to_thread.run_sync(self.reservations.make, count, self.block_size,
                                             limiter=self.local_limiter)
        self.space.wrote(len(made) * self.block_size)
        return made

    def release_room(self, reserved_ids: list[str]) -> None:
        self.reservations.release(reserved_ids)

    async def wait_disk_full(self) -> None:
        """Return once a writer finds the cache disk full (`DiskSpace.wait_filled`)."""
        await self.space.wait_filled()

    def room_to_keep(self, size: int) -> bool:
        return self.space.room_to_keep(size)

    # -- the metadata's commits (meta/commits.py's CommitHooks) -----------------------------

    def before_commit(self) -> None:
        self.space.make_commit_room()

    def after_commit(self, commit: int, awaits_upload: Callable[[str], bool]) -> None:
        self.dirty.committed(commit, awaits_upload)
        self.files.release_discarded(commit)

    def after_rollback(self, awaits_upload: Callable[[str], bool]) -> None:
        self.dirty.take_back(awaits_upload)

    def after_sync(self, synced: int) -> None:
        self.files.synced(synced)

    # -- reading ---------------------------------------------------------------------------

    def read_dirty(self, block_id: str, offset: int, size: int) -> bytes:
        return os.pread(self.files.fd(block_id), size, offset)

    async def read(self, block_id: str, csum: str | None, pack: str | None, offset: int,
                   size: int) -> bytes:
        """Read up to `size` bytes of a block from `offset` (short at the block's end).

        `csum` and `pack` are what the block map records (see `CleanCache.download`).
        """
        if block_id in self.dirty.lengths:
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
        if block_id not in self.dirty.lengths:
            self.clean.prefetch(nursery, block_id, csum, pack)

    # -- uploading (driven by the sync layer) ----------------------------------------------

    def seal_all(self) -> list[str]:
        return self.dirty.seal_all()

    async def upload(self, block_id: str) -> str:
        return await self.uploads.upload(block_id)

    async def upload_pack(self, block_ids: list[str]) -> tuple[str, dict[str, str]]:
        return await self.uploads.upload_pack(block_ids)

    def retire(self, block_id: str, uploaded_at: int | None) -> None:
        self.dirty.retire(block_id, uploaded_at)

    def uploaded(self, block_ids: list[str]) -> None:
        self.dirty.uploaded(block_ids)

    def awaiting_commit(self) -> tuple[int, int]:
        """Bytes and blocks uploaded whose checksums await their commit (still dirty)."""
        return self.dirty.awaiting_bytes, len(self.dirty.awaiting_commit)

    def is_doomed(self, block_id: str) -> bool:
        return self.dirty.is_doomed(block_id)

    def close(self) -> None:
        self.reservations.close()
        self.journal.close()
        self.files.close()
        self.clean.close()
