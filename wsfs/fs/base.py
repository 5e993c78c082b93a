"""POSIX semantics: the pyfuse3 request handlers, and the workspace marker policy.

Every handler runs in the one trio thread. Metadata statements run synchronously between
awaits, so a handler that does not await is atomic; one that does (a read or a write that must
download a block) takes the inode's lock first, so that two writers of one file never race on
its block map. The kernel does the permission checks (`default_permissions`) and, with the
writeback cache, owns mtime and size while a file is being written: it sends them back to us
through setattr.

File offsets become blocks here: block `idx` of a file covers bytes [idx*bs, (idx+1)*bs). The
block layer never learns which file a block belongs to.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..blocks import BlockCache
from ..config import env_seconds
from ..latency import Latencies
from ..meta import BlockRef, Inode, Metadata
from ..meta.schema import MARKER, ROOT
from .coherence import DirectWrites

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
READAHEAD_BLOCKS = 12  # three packs of full blocks (blocks/pack.py)
PREFETCH_FILES = 64  # small files of a directory fetched together after a cache miss
STATFS_CACHE_SECONDS = 5.0
# Inodes whose last name, handle and kernel reference are gone are deleted in batches: rm -r
# of 5,000 files sent 5,000 forgets, and a transaction of its own for each inode cost ~70 us
# of SQL apiece. A batch goes REAP_DELAY after its first inode, at REAP_BATCH inodes, before
# statfs counts inodes and before each flush cycle's snapshot (the unmount's too). A crash in
# between leaves inodes with no name and nlink 0, which recovery deletes as it does files
# unlinked while open. $WSFS_REAP_DELAY changes the delay (tests hold a batch open with it).
REAP_BATCH = 512
REAP_DELAY = 0.05
# Listings kept for readdir (see `_listings`): `ls -lR`, `git status` and Jupyter's file
# browser list the same directories again and again, and building each entry's attributes
# was most of a listing's cost once `ls -l` stopped asking for ACLs. At most this many
# entries in all (~300 bytes each), a quarter of it for one directory; a directory with more
# is listed page by page, uncached.
LISTING_CACHE_ENTRIES = 16384
LISTING_CACHE_DIR_MAX = LISTING_CACHE_ENTRIES // 4
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
ListedEntry = tuple[pyfuse3.FileNameT, pyfuse3.EntryAttributes, int]  # name, attributes, cookie


def _invalidate_pages(ino: int) -> None:
    pyfuse3.invalidate_inode(pyfuse3.InodeT(ino))


def drop_blocks(meta: Metadata, blocks: BlockCache, refs: Sequence[BlockRef]) -> None:
    """Release blocks the metadata stopped referencing (in the caller's transaction): a dirty
    block's file goes, and the object of one that reached the store becomes garbage."""
    meta.add_garbage_of([r for r in refs if blocks.discard(r.id)])


class _Txn:
    """`with` this: the statements inside apply together or, on any exception, not at all.

    A class, not a @contextmanager generator: it runs in most write requests, and a
    generator costs several times as much to enter and leave. Holds no state, so one
    instance serves every (even nested) use.
    """

    __slots__ = ("meta",)

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta

    def __enter__(self) -> None:
        self.meta.begin()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc_type is None:
            self.meta.commit()
        else:
            self.meta.rollback()


class Base(pyfuse3.Operations):
    """The state every handler shares, and the helpers they use."""

    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(
        self,
        meta: Metadata,
        blocks: BlockCache,
        *,
        cache_timeout: float = 300.0,
        read_only: bool = False,
        remote_fsync: Callable[[], Awaitable[None]] | None = None,
        latencies: Latencies | None = None,
        invalidate_pages: Callable[[int], None] | None = None,
        writeback: Callable[[], Awaitable[None]] | None = None,
        still_read_only: Callable[[], bool] | None = None,
    ) -> None:
        """`writeback`: has the kernel hand this filesystem every dirty page it holds (syncfs
        on the mount, from a worker thread), for answers that must see them (`lseek`).
        `still_read_only`: whether the kernel still holds a `read_only` mount read-only;
        asked when a write reaches it anyway (`_writable`)."""
        super().__init__()
        # every handler's duration, by operation (see _guarded in fs/__init__.py)
        self.latencies = latencies if latencies is not None else Latencies()
        self.meta = meta
        self.blocks = blocks
        self.bs = blocks.block_size
        self.timeout = cache_timeout
        self.read_only = read_only
        self.still_read_only = still_read_only
        self.fenced: str | None = None  # why this mount takes no more writes (fence())
        self._fenced_fh = 0  # handles below it were opened before the fence
        self.remote_fsync = remote_fsync
        self.writeback = writeback
        self.nursery: trio.Nursery | None = None  # for readahead; set by the mount
        self.initialized = trio.Event()  # see init()
        self._lookups: dict[int, int] = defaultdict(int)
        self._open: dict[int, int] = defaultdict(int)  # inode -> open file handles
        self._handles: dict[int, int] = {}  # fh -> inode
        self._read_end: dict[int, int] = {}  # fh -> where the last read ended (readahead)
        self._ahead_to: dict[int, int] = {}  # fh -> first block readahead has not asked for
        self._next_fh = 1
        # handles that write with O_DIRECT, and the page-cache invalidations they need;
        # `invalidate_pages` drops an inode's cached pages (tests replace the kernel's)
        self.direct = DirectWrites(invalidate_pages or _invalidate_pages)
        self._prefetched_dirs: set[int] = set()
        self._synced_changes = -1  # metadata changes counted at the last completed fsync
        self._statfs_at = -STATFS_CACHE_SECONDS
        self._statfs_counts = (0, 0, 0)
        # Directories whose listing reached its end, by the cookie it ended at; valid while
        # `meta.dentry_changes` is still `_listed_at` (see readdir).
        self._listed_to: dict[int, int] = {}
        self._listed_at = -1
        # Whole listings of directories (cookies, then entries with their attributes), served
        # again while no metadata changed at all: `meta.total_changes` and
        # `meta.dentry_changes` are still `_listings_at` (see readdir).
        self._listings: dict[int, tuple[list[int], list[ListedEntry]]] = {}
        self._listings_at = (-1, -1)
        self._listed_entries = 0
        self._locks: dict[int, trio.Lock] = {}
        # Room reserved on the cache disk for holes fallocate(2) allocated: inode -> block
        # index -> reservation id (blocks/reserved.py), used by the first write there.
        self._reserved: dict[int, dict[int, str]] = {}
        self._doomed: set[int] = set()  # inodes to delete in the next batch (REAP_BATCH)
        self._reap_due = False
        self._reap_delay = env_seconds("WSFS_REAP_DELAY", REAP_DELAY)
        self.marker_ino = meta.lookup(ROOT, MARKER)
        self._the_txn = _Txn(meta)

    def init(self) -> None:
        """Called by pyfuse3 while it answers the kernel's INIT request; the answer is
        written by the time a task waiting on `initialized` runs (the kernel settles some
        of the mount's parameters, such as its readahead, only then)."""
        self.initialized.set()

    # -- helpers ---------------------------------------------------------------------------

    async def durable_metadata(self) -> None:
        """Make every metadata change so far durable (the data journal's epoch end waits for
        it: blocks/journal.py; every `blocks.fsync` is given this object for it)."""
        changes = self.meta.total_changes
        self.meta.flush()
        await trio.to_thread.run_sync(self.meta.sync, limiter=self.blocks.local_limiter)
        self._synced_changes = max(self._synced_changes, changes)

    def _txn(self) -> _Txn:
        """Group a handler's statements so a crash never leaves half of them."""
        return self._the_txn

    def _node(self, ino: int) -> Inode:
        node = self.meta.get_inode(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Inode, nblocks: int | None = None) -> pyfuse3.EntryAttributes:
        """The attributes the kernel caches for `timeout` seconds (we are the only writer).

        `nblocks` is the number of stored blocks of a regular file, if the caller has it.
        """
        a = pyfuse3.EntryAttributes()  # zeroed: generation and st_blocks start at 0
        a.st_ino = node.id
        a.entry_timeout = a.attr_timeout = self.timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        size = a.st_size = node.size
        a.st_blksize = 128 * 1024
        if size and node.mode & 0o170000 == stat.S_IFREG:
            if nblocks is None:
                nblocks = self.meta.block_count(node.id)
            a.st_blocks = (min(size, nblocks * self.bs) + 511) // 512
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _meta_for(self, ino: int) -> Metadata:
        """The metadata that answers for inode `ino`'s attributes and contents: the mount's
        (a read-only view answers for an open file from the checkpoint it was opened on:
        fs/views.py)."""
        return self.meta

    def _block_now(self, ino: int, ref: BlockRef) -> BlockRef | None:
        """Where block `ref.idx` of `ino` is now, when `ref` could not be read: None if the
        file lost it meanwhile (a hole now), `ref` itself if nothing moved."""
        return self.meta.blocks_in(ino, ref.idx, ref.idx).get(ref.idx)

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a new reference to the inode."""
        self._lookups[node.id] += 1
        return self._attr(node)

    def _writable(self, ino: int | None = None) -> None:
        """Raise EROFS on a read-only or fenced mount. Fenced, the writes to `ino` through
        handles opened before still land: under the writeback cache the kernel acknowledged
        them at write(2) and sends them later, and refusing them then would lose them (they
        come back as conflict copies instead, like everything accepted before the fence)."""
        if self.read_only:
            # The kernel refuses every write to a read-only superblock itself, so one that
            # reaches this mount was let through by a `mount -o remount,rw` since (FUSE sends
            # no request for a remount): from now on writes are the kernel's to refuse, as on
            # a mount started read-write and switched with `remount,ro`.
            if self.still_read_only is None or self.still_read_only():
                raise FUSEError(errno.EROFS)
            self.read_only = False
            log.info("the mount was switched to read-write (mount -o remount,rw): "
                     "writes are taken from now on")
        if self.fenced is not None and (ino is None or not any(
                i == ino and fh < self._fenced_fh for fh, i in self._handles.items())):
            raise FUSEError(errno.EROFS)

    def fence(self, reason: str) -> None:
        """Take no more writes: another mount holds the workspace (`reason` says why)."""
        if self.fenced is None:
            self.fenced = reason
            self._fenced_fh = self._next_fh

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)

    def _is_marker(self, parent: int, name: bytes) -> bool:
        return parent == ROOT and name == MARKER

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    def _touch_dir(self, node: Inode, ts: int) -> None:
        node.mtime_ns = node.ctime_ns = ts
        self.meta.save_inode(node)

    def _drop_blocks(self, refs: Sequence[BlockRef]) -> None:
        drop_blocks(self.meta, self.blocks, refs)

    def _last_closed(self, ino: int) -> None:
        """The last handle of `ino` was released."""
        self._maybe_delete(ino)

    def _maybe_delete(self, ino: int) -> None:
        """Delete an inode once no entry names it, no handle holds it and the kernel forgot
        it: in the next batch (REAP_BATCH)."""
        if self._lookups.get(ino) or self._open.get(ino):
            return
        node = self.meta.get_inode(ino)
        if node is None or node.nlink:
            return
        self._doomed.add(ino)
        if len(self._doomed) >= REAP_BATCH or self.nursery is None:
            self.reap()
        elif not self._reap_due:
            self._reap_due = True
            self.nursery.start_soon(self._reap_soon)

    async def _reap_soon(self) -> None:
        await trio.sleep(self._reap_delay)
        self._reap_due = False
        try:
            self.reap()
        except (OSError, sqlite3.OperationalError) as e:  # a full disk: they wait for the next
            log.warning("cannot delete %d unlinked inodes yet: %s", len(self._doomed), e)
        except Exception:
            log.exception("could not delete %d unlinked inodes", len(self._doomed))

    def reap(self) -> None:
        """Delete the inodes queued by `_maybe_delete`, in one transaction."""
        if not self._doomed:
            return
        doomed, self._doomed = self._doomed, set()
        doomed = {i for i in doomed if not (self._lookups.get(i) or self._open.get(i))}
        try:
            with self._txn():
                self._drop_blocks(self.meta.delete_inodes(list(doomed)))
        except BaseException:
            self._doomed |= doomed
            raise
        self._statfs_at = -STATFS_CACHE_SECONDS  # the inode count changed
        for ino in doomed:
            self._locks.pop(ino, None)
            self._unreserve(ino)

    def _unreserve(self, ino: int, first: int = 0, last: int | None = None) -> None:
        """Release the room reserved for the holes first..last of `ino` (all by default)."""
        held = self._reserved.get(ino)
        if not held:
            return
        gone = [i for i in held if first <= i and (last is None or i <= last)]
        self.blocks.release_room([held.pop(i) for i in gone])
        if not held:
            del self._reserved[ino]

    def _open_handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        self._open[ino] += 1
        self.direct.opened(fh, ino, flags)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)
