"""The files under `dirty/`: open fds, empty files made ahead of need, and the files of
dropped blocks, held until a covering sync and then recycled or deleted.

A dirty block is a local file `dirty/<id>`. Creating, closing and deleting files cost the
FUSE thread more than writing them, so this module keeps fds open (up to MAX_OPEN_FILES),
keeps a pool of empty files ready, and does the closing and deleting in worker threads
(`maintain`). A dropped block's file must also outlive the metadata that named it: it is
held until the metadata change that lets it go is committed, and then until a sync of the
metadata makes that commit durable (a machine crash must not bring back metadata naming a
block whose file is gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import trio

from .clean import CleanCache
from .space import DiskSpace

log = logging.getLogger(__name__)

# Empty dirty files kept ready: creating a file costs ~0.1-1 ms of the FUSE thread, and a
# burst of new small files (tar, git checkout) drained a pool of 64 in a tenth of a second.
POOL_SIZE = 256
# The files of dropped dirty blocks are emptied and renamed into the pool instead of deleted,
# up to this many: on the ext4 of our hosts creating a file costs ~150-200 us of CPU, emptying
# and renaming one ~10 us, and every new small file needs a block file (tar and git add of
# a package tree created thousands, in a worker thread that took the CPU from the FUSE thread).
POOL_MAX = 4096
MAX_OPEN_FILES = 256


class DirtyFiles:
    """The dirty blocks' files and fds (see the module docstring); blind to their content."""

    def __init__(self, dirty_dir: Path, *, space: DiskSpace, clean: CleanCache,
                 local_limiter: trio.CapacityLimiter) -> None:
        self.dir = dirty_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.space = space  # `maintain` keeps its ballast
        self.clean = clean  # `maintain` deletes its discarded copies
        self.local_limiter = local_limiter
        self.fds: dict[str, int] = {}
        # Empty files made ahead of need by `maintain`: creating a file costs the FUSE thread
        # more than writing it, and a new small file needs one.
        self._pool: list[tuple[str, int]] = []  # (id, open fd)
        # Recycled files beyond what the pool holds open (POOL_MAX): ids of empty files.
        self._spare: list[str] = []
        # Dirty blocks a copy on write is reading in a worker thread: their files are deleted,
        # never recycled, when they are dropped meanwhile (a recycled file changes content).
        self.copying: set[str] = set()
        # Files of blocks let go of (id, and the fd still open on it or -1): kept until the
        # metadata change that lets them go is committed, then until a sync of the metadata
        # makes that commit durable (a machine crash must not bring back metadata naming a
        # block whose file is gone), then closed and deleted in batches by `maintain` in a
        # worker thread (never in the FUSE thread).
        self._unlink_after_commit: list[tuple[str, int]] = []
        self._unlink_after_sync: list[tuple[int, str, int]] = []  # (commit, id, fd)
        self._unlink_ready: list[tuple[str, int]] = []
        # The number of metadata commits made durable so far (`synced`, told by the
        # metadata's sync): files waiting for a commit up to it may go.
        self.synced_commits = 0

    # -- fds -------------------------------------------------------------------------------

    def path(self, block_id: str) -> Path:
        return self.dir / block_id

    def fd(self, block_id: str) -> int:
        fd = self.fds.get(block_id)
        if fd is None:
            path = self.path(block_id)
            try:  # O_CREAT only when needed: it locks the directory the pool work renames in
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self.keep_fd(block_id, fd)
        return fd

    def keep_fd(self, block_id: str, fd: int) -> None:
        if len(self.fds) >= MAX_OPEN_FILES:  # close the least recently opened
            os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[block_id] = fd

    def close_fd(self, block_id: str) -> None:
        fd = self.fds.pop(block_id, None)
        if fd is not None:
            os.close(fd)

    def take_empty(self) -> tuple[str, int]:
        """An empty file for a new block: (id, its open fd), or (id, -1) for a file to open
        (a recycled one, or a new id whose file does not exist yet)."""
        if self._pool:
            return self._pool.pop()
        if self._spare:
            return self._spare.pop(), -1
        return secrets.token_hex(16), -1

    def adopt(self, block_id: str, path: Path) -> None:
        """Make the file at `path` (a reservation, on the same disk) new block `block_id`'s."""
        os.rename(path, self.path(block_id))
        self.keep_fd(block_id, os.open(self.path(block_id), os.O_RDWR))

    def give_back_empty(self, block_id: str, fd: int) -> None:
        """Return an open file `take_empty` gave that stayed empty, ready for the next block."""
        self._pool.append((block_id, fd))

    # -- files let go of -------------------------------------------------------------------

    def hold(self, block_id: str, synced_after: int | None = None) -> None:
        """Keep a dropped block's file until it may go: after the next commit and its sync,
        or with `synced_after`, after a sync of the metadata covering that commit. Its fd
        is closed later in a worker thread (closing the last fd of a file is part of what
        made a delete cost the FUSE thread)."""
        fd = self.fds.pop(block_id, -1)
        if fd >= 0 and len(self._unlink_after_commit) + len(self._unlink_after_sync) \
                >= MAX_OPEN_FILES:  # many deletes between two syncs
            os.close(fd)
            fd = -1
        if synced_after is None:
            self._unlink_after_commit.append((block_id, fd))
        else:
            self._unlink_after_sync.append((synced_after, block_id, fd))

    def take_back(self, referenced: Callable[[str], bool]) -> list[tuple[str, int]]:
        """Stop holding the files (held since the last commit) of the blocks a rollback
        brought back (`referenced(id)`); return them with their lengths (see
        `DirtyBlocks.take_back`)."""
        gone = []
        back = []
        for block_id, fd in self._unlink_after_commit:
            if not referenced(block_id):
                gone.append((block_id, fd))
                continue
            try:
                length = os.stat(self.path(block_id)).st_size
            except OSError as e:  # (a hook after a rollback must not fail in its turn)
                log.error("cannot take back block %s: %s", block_id, e)
                gone.append((block_id, fd))
                continue
            if fd >= 0:
                self.keep_fd(block_id, fd)
            back.append((block_id, length))
        self._unlink_after_commit = gone
        return back

    def release_discarded(self, commit: int) -> None:
        """Let go of the files of blocks discarded before the metadata commit that just ran
        (number `commit`), once that commit is durable.

        A discarded block's file outlives the transaction that dropped its reference: if the
        daemon dies before that commit, the metadata that comes back still names the block,
        and its data must still be there; if the machine dies before the commit reached the
        disk, the same (called after every commit: BlockCache.after_commit).
        """
        self._unlink_after_sync.extend((commit, b, fd) for b, fd in self._unlink_after_commit)
        self._unlink_after_commit.clear()

    def synced(self, commits: int) -> None:
        """The metadata commits up to number `commits` are durable (told from the worker
        thread of the metadata's sync: a plain assignment, read by `_release_synced`). Two
        syncs ending at once may leave the smaller number: files then wait for the next
        sync, never the reverse."""
        self.synced_commits = commits

    def _release_synced(self) -> None:
        """Move the files whose commit a metadata sync has made durable to the deletions."""
        if not self._unlink_after_sync:
            return
        synced = self.synced_commits
        keep = []
        for entry in self._unlink_after_sync:
            if entry[0] <= synced:
                self._unlink_ready.append(entry[1:])
            else:
                keep.append(entry)
        self._unlink_after_sync = keep

    def awaiting_sync(self) -> bool:
        """Whether files wait for a metadata sync before they can go (the flusher then syncs
        soon: on a full disk, writers wait for that space)."""
        return bool(self._unlink_after_sync)

    def space_coming(self) -> bool:
        """Whether deleted blocks are about to free disk space (a full disk waits for it)."""
        return bool(self._unlink_after_commit or self._unlink_after_sync or self._unlink_ready)

    # -- upkeep (worker threads) -----------------------------------------------------------

    async def maintain(self) -> None:
        """Background upkeep in worker threads: delete released files and the clean copies
        of discarded blocks, refill the pool."""
        while True:
            self._release_synced()
            doomed, self._unlink_ready = self._unlink_ready, []
            gone = self.clean.take_discarded()
            room = max(0, POOL_MAX - len(self._spare))
            reuse = [d for d in doomed if d[0] not in self.copying][:room]
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
                        made.append((block_id, os.open(self.path(block_id), os.O_RDWR)))
                self._unlink_files(doomed)
                with contextlib.suppress(OSError):
                    self.space.keep_ballast()
                try:
                    for _ in range(want - len(made)):
                        block_id = secrets.token_hex(16)
                        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
                        made.append((block_id, os.open(self.path(block_id), flags, 0o600)))
                except OSError as e:  # a full disk: keep what is made, writers make their own
                    log.debug("cannot prepare dirty files: %s", e)
                return made, ids[want:]

            if doomed or reuse or want or gone or not self.space.ballast.exists():
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
        base = str(self.dir) + os.sep
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
        base = str(self.dir) + os.sep
        for block_id, fd in doomed:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + block_id)

    def close(self) -> None:
        for block_id, fd in self._pool:
            os.close(fd)
            self.path(block_id).unlink(missing_ok=True)
        self._pool.clear()
        for block_id in self._spare:
            self.path(block_id).unlink(missing_ok=True)
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
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
