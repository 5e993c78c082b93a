"""Clean blocks: local copies of what the store holds (diskcache, LRU), and their download.

A clean copy can always be fetched again, so this cache may lose anything at any time: it is
evicted by size, emptied when the disk is full at start, and its failures to keep a copy are
ignored. Downloads are deduplicated (one per block, or per pack however many of its members
are wanted), bounded by a deadline, and checked against the checksum the block map records.
"""

from __future__ import annotations

import io
import logging
import shutil
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import IO

import diskcache
import trio

from ..backoff import Backoff
from ..store import NoSuchKey, ObjectStore, TransientStoreError
from . import pack as packs
from .files import checksum, disk_full, object_key

log = logging.getLogger(__name__)

# Seconds a block whose download just timed out fails at once instead of waiting again.
RECENT_FAILURE = 1.0
RECENT_BLOCKS = 8  # whole clean blocks kept in memory for sequential readers
# Downloaded blocks no reader has asked for yet (readahead, a pack's other members), kept in
# memory until one does: reading back the copy just written cost the FUSE thread a query, an
# open(2) and a 1 MiB read per block, a tenth of a cold sequential read's CPU.
FETCHED_BLOCKS = 16
SEQUENTIAL_READ = 64 * 1024  # reads this large come from readahead: keep the whole block
CLEAN_DB_CACHE_PAGES = 256  # SQLite pages (4 KiB) each clean-cache connection caches


class BlockCorrupt(Exception):
    """A downloaded block does not match its checksum, or is missing from the store."""


def open_clean_cache(path: Path, size_limit: int) -> diskcache.Cache:
    """Open the clean-block cache; on a cache disk full of dirty data, empty it first.

    Clean blocks are copies of what the store holds. A daemon that stopped with its disk full
    must still start, so it can upload the dirty blocks that fill it.
    """
    def cache() -> diskcache.Cache:
        # diskcache opens one SQLite connection per thread (up to 32 upload/download workers),
        # and by default each maps 64 MiB of its database and caches 32 MiB of pages: with
        # small files stored inline, a daemon creating 100,000 files held 250 MB of such maps.
        # The kernel's page cache serves these reads as well.
        return diskcache.Cache(str(path), size_limit=size_limit,
                               eviction_policy="least-recently-used", cull_limit=64,
                               sqlite_mmap_size=0, sqlite_cache_size=CLEAN_DB_CACHE_PAGES)

    try:
        return cache()
    except (OSError, sqlite3.OperationalError) as e:
        if not disk_full(e):
            raise
        log.warning("the cache disk is full: emptying the clean cache %s to start", path)
        shutil.rmtree(path, ignore_errors=True)
        return cache()


class CleanCache:
    """Clean copies of blocks, on disk and the last few in memory, and their downloads."""

    def __init__(self, path: Path, store: ObjectStore, *, block_size: int, size_limit: int,
                 limiter: trio.CapacityLimiter, read_timeout: float) -> None:
        self.store = store
        self.block_size = block_size
        self.limiter = limiter
        self.read_timeout = read_timeout
        self.db = open_clean_cache(path, size_limit)
        # Downloads may be abandoned at their deadline while their thread still waits on a
        # stalled connection (holding a token until it ends): a limiter of their own keeps
        # those from starving uploads.
        self.fetch_limiter = trio.CapacityLimiter(16)
        self._prefetching = trio.Semaphore(8)
        self._last_fetch_error: str | None = None
        self._timed_out: dict[str, float] = {}  # block id -> when its download timed out
        # The last few whole blocks read from the clean cache: a sequential reader asks for
        # 128 KiB at a time, and each clean-cache lookup is a query plus an open(2).
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._fetched: OrderedDict[str, bytes] = OrderedDict()  # FETCHED_BLOCKS
        self._discarded: list[str] = []  # blocks whose clean copies are to be deleted
        # Blocks whose id is being written again (`forget`): their copy here, if any, holds
        # older bytes and is never served, until a new copy is kept or the old one deleted.
        self._stale: set[str] = set()
        self._downloads: dict[str, trio.Event] = {}  # object key -> set when fetched
        self.downloads = 0  # blocks fetched from the store, readahead and prefetch included

    def __contains__(self, block_id: str) -> bool:
        return block_id not in self._stale and (
            block_id in self._recent or block_id in self._fetched or block_id in self.db)

    def volume(self) -> int:
        return int(self.db.volume())

    def clear(self) -> None:
        self._recent.clear()
        self._fetched.clear()
        self.db.clear()

    def discard(self, block_id: str) -> None:
        """Forget the clean copy of a block nothing references any more.

        Its entry is deleted later, with others, in a worker thread (`take_discarded`, then
        `delete`): one diskcache transaction per block in the FUSE thread made removing an
        uploaded tree ~25 % slower than removing one not yet uploaded. Until then the entry
        only takes room: block ids are never reused, so no one asks for it again.
        """
        self._recent.pop(block_id, None)
        self._fetched.pop(block_id, None)
        self._discarded.append(block_id)

    def forget(self, block_id: str) -> None:
        """The block's id is written again (its checksum's commit was rolled back, or a crash
        lost it, so the block is dirty once more): a copy kept after its earlier upload holds
        older bytes, and must never be served, even if the next upload's copy cannot be kept."""
        self._stale.add(block_id)
        self.discard(block_id)

    def take_discarded(self) -> list[str]:
        """The blocks discarded since the last call, for `delete`."""
        gone, self._discarded = self._discarded, []
        return gone

    def delete(self, block_ids: list[str]) -> None:
        """Delete clean copies, in one transaction (blocking)."""
        if not block_ids:
            return
        try:
            with self.db.transact():
                for block_id in block_ids:
                    self.db.delete(block_id)
        except (OSError, sqlite3.Error) as e:  # they only take room until evicted
            retry = [b for b in block_ids if b in self._stale]  # (never served meanwhile)
            log.log(logging.DEBUG if disk_full(e) or len(retry) == len(block_ids)
                    else logging.WARNING, "could not delete %d clean copies: %s",
                    len(block_ids), e)
            self._discarded.extend(retry)
        else:
            self._stale.difference_update(block_ids)

    def close(self) -> None:
        self.delete(self.take_discarded())
        self.db.close()

    # -- reading ---------------------------------------------------------------------------

    def read(self, block_id: str, offset: int, size: int) -> bytes | None:
        """Up to `size` bytes of a cached block from `offset`; None if it is not cached."""
        if block_id in self._stale:
            return None
        recent = self._recent.get(block_id)
        if recent is not None:
            self._recent.move_to_end(block_id)
            return recent[offset : offset + size]
        fetched = self._fetched.pop(block_id, None)
        if fetched is not None:
            self.remember(block_id, fetched)
            return fetched[offset : offset + size]
        f = self.db.get(block_id, default=None, read=True)
        if f is None:
            return None
        if isinstance(f, bytes):  # diskcache keeps small values inline in its database
            return f[offset : offset + size]
        with f:
            if size < SEQUENTIAL_READ:  # a random reader: read just the range
                f.seek(offset)
                return bytes(f.read(size))
            whole = bytes(f.read())
        self.remember(block_id, whole)
        return whole[offset : offset + size]

    def remember(self, block_id: str, content: bytes) -> None:
        """Keep a whole block in memory for the next reads of a sequential reader (only a
        reader's blocks: readahead's would push out the one being read)."""
        self._recent[block_id] = content
        if len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)

    def open(self, block_id: str) -> bytes | IO[bytes] | None:
        """A cached block as bytes (small, kept inline) or an open file; None if not cached
        (blocking: for copies made file to file in a worker thread)."""
        if block_id in self._stale:
            return None
        f: bytes | IO[bytes] | None = self.db.get(block_id, default=None, read=True)
        return f

    def content(self, block_id: str) -> bytes | None:
        """A cached block's whole content, or None (blocking)."""
        f = self.open(block_id)
        if f is None or isinstance(f, bytes):
            return f
        with f:
            return bytes(f.read())

    # -- keeping ---------------------------------------------------------------------------

    def keep(self, members: dict[str, bytes]) -> None:
        """Put clean copies in the cache, in one transaction (blocking); a full disk only
        costs the caching.

        Values too big to live inline in diskcache's database are handed over as files:
        given bytes, diskcache writes its file line by line (it iterates a BytesIO), which
        made a cold sequential read spend a third of its time in write(2) calls.
        """
        try:
            with self.db.transact():
                for block_id, data in members.items():
                    if len(data) < self.db.disk.min_file_size:
                        self.db.set(block_id, data)
                    else:
                        self.db.set(block_id, io.BytesIO(data), read=True)
        except (OSError, sqlite3.OperationalError) as e:
            if not disk_full(e):
                raise
        else:
            self._stale.difference_update(members)  # their copies are the new bytes now

    async def evict(self, amount: int) -> None:
        """Free `amount` bytes of the cache disk, if this cache holds them.

        The limit is lowered for the rest of the mount: the disk cannot hold what
        --cache-size asked for.
        """
        if amount <= 0:
            return

        def work() -> tuple[int, int]:
            volume = int(self.db.volume())
            limit = max(0, volume - amount - self.block_size)
            if limit < int(self.db.size_limit):
                self.db.reset("size_limit", limit)
                self.db.cull()
            return volume, limit

        volume, limit = await trio.to_thread.run_sync(work, limiter=self.limiter)
        if limit < volume:
            log.warning("the cache disk is full: clean cache limit lowered to %d bytes", limit)

    # -- downloading -----------------------------------------------------------------------

    async def download(self, block_id: str, csum: str | None, pack: str | None = None) -> bytes:
        """Fetch a clean block into the cache, retrying an unreachable store until the
        read deadline (`read_timeout`), then raise TransientStoreError (the reader gets EIO).

        `csum` and `pack` are what the block map records: the checksum the download must
        match, and the pack holding the block (None: the block is an object of its own).
        The worker thread is abandoned at the deadline: a stalled connection must not hold a
        reader longer than that, and an abandoned download has no effect but a cache entry.
        A block that just timed out fails at once for a few seconds: the kernel retries a
        failed readahead page by page, which would otherwise make one read(2) wait twice.
        """
        failed_at = self._timed_out.get(block_id)
        if failed_at is not None and trio.current_time() - failed_at < RECENT_FAILURE:
            raise TransientStoreError(f"block {block_id} could not be downloaded (it timed "
                                      f"out a moment ago: {self._last_fetch_error or 'no answer'})")
        with trio.move_on_after(self.read_timeout):
            data = await self._download(block_id, csum, pack)
            self._timed_out.pop(block_id, None)
            return data
        self._timed_out[block_id] = trio.current_time()
        if len(self._timed_out) > 1024:
            self._timed_out.pop(next(iter(self._timed_out)))
        raise TransientStoreError(
            f"block {block_id} could not be downloaded within {self.read_timeout:g}s "
            f"({self._last_fetch_error or 'no answer from the store'})"
        )

    async def _download(self, block_id: str, csum: str | None, pack: str | None) -> bytes:
        """Fetch a clean block into the cache (once, however many readers wait for it; a
        packed block's whole pack once, however many of its members are wanted)."""
        key = pack or block_id
        while (event := self._downloads.get(key)) is not None:
            await event.wait()
        whole = self.read(block_id, 0, self.block_size)
        if whole is not None:
            return whole
        event = self._downloads[key] = trio.Event()
        backoff = Backoff(0.2, 5.0)
        try:
            while True:
                try:
                    found = await trio.to_thread.run_sync(
                        self._download_blocking, block_id, csum, pack,
                        limiter=self.fetch_limiter, abandon_on_cancel=True,
                    )
                    wanted = found.pop(block_id)
                    for other, content in found.items():  # a pack's other members
                        self._hold(other, content)
                    return wanted
                except TransientStoreError as e:
                    self._last_fetch_error = str(e)
                    log.warning("download of block %s failed, retrying in %.1fs: %s",
                                block_id, backoff.delay, e)
                    await backoff.sleep()
        finally:
            del self._downloads[key]
            event.set()

    def _download_blocking(self, block_id: str, csum: str | None, pack: str | None
                           ) -> dict[str, bytes]:
        """Fetch the object holding a block, check it, keep its blocks (blocking); return
        them all, by id."""
        where = f"pack {pack}" if pack else "the store"
        try:
            blob = self.store.get(object_key(pack or block_id))
        except NoSuchKey:
            raise BlockCorrupt(f"block {block_id} is missing from {where}") from None
        if pack is None:
            found = {block_id: (checksum(blob), blob)}
        else:
            try:
                found = packs.split(blob)
            except packs.PackCorrupt as e:
                raise BlockCorrupt(f"block {block_id}: {e} ({where})") from None
        got = found.get(block_id)
        if got is None or (csum is not None and got[0] != csum):
            raise BlockCorrupt(f"block {block_id} does not match its checksum ({where})")
        self.downloads += 1
        contents = {b: data for b, (_, data) in found.items()}
        self.keep(contents)
        return contents

    def _hold(self, block_id: str, content: bytes) -> None:
        """Keep a downloaded block in memory for the reader that will ask for it."""
        if block_id in self._recent:
            return
        self._fetched[block_id] = content
        if len(self._fetched) > FETCHED_BLOCKS:
            self._fetched.popitem(last=False)

    def prefetch(self, nursery: trio.Nursery, block_id: str, csum: str | None,
                 pack: str | None) -> None:
        """Start downloading a block in the background (readahead); errors are left to read."""
        if (pack or block_id) in self._downloads or block_id in self:
            return

        async def fetch() -> None:
            try:
                async with self._prefetching:  # leaves download slots to readers
                    self._hold(block_id, await self.download(block_id, csum, pack))
            except Exception as e:  # the reader that needs it will see the error
                log.debug("readahead of %s failed: %s", block_id, e)

        nursery.start_soon(fetch)
