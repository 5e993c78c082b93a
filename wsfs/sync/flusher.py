"""The one place that orders durability: dirty blocks up first, then the checkpoint.

A flush cycle, in order:
1. seal every dirty block and pin a read snapshot of the metadata, in the trio thread with no
   await between them, so the snapshot references only sealed or already-uploaded blocks;
2. copy the snapshot aside (worker thread) and release it;
3. upload the sealed blocks in parallel, the small ones together as packs (blocks/pack.py),
   retrying with backoff (transfers.py); each uploaded block gets its checksum (and pack)
   recorded and moves to the clean cache at once (it is in the store, whatever happens to
   the rest of the cycle);
4. fill the checksums into the copy, refuse to go on if any referenced block still lacks one,
   and publish it (pages, manifest, then HEAD);
5. then let the garbage the snapshot left out go, once no kept checkpoint names it
   (retain.py: the checkpoints are thinned on the schedule, `--keep`).

Invariant: the store always holds a consistent filesystem as of its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ..backoff import Backoff
from ..blocks import BlockCache
from ..blocks import pack as packs
from ..blocks.cache import MIN_RESERVE
from ..errors import FlushError, LeaseError
from ..meta import Metadata
from ..meta import checkpoint as ckpt
from ..meta.retention import Schedule
from ..store import NoSuchKey, ObjectStore
from .retain import Retention
from .transfers import Transfers

log = logging.getLogger(__name__)

T = TypeVar("T")
COMMIT_INTERVAL = 0.5  # seconds of un-fsynced metadata a daemon crash can lose


class Filesystem(Protocol):
    """What a cycle asks of the filesystem above (fs/base.py's Operations)."""

    def reap(self) -> None:
        """Delete the inodes queued for deletion (in the trio thread, before each snapshot),
        so that no checkpoint carries files deleted before it."""


class LeaseCheck(Protocol):
    """The single-writer lease (daemon/lease.py), checked before each publication."""

    def check(self) -> None:
        """Raise LeaseError once another mount holds the workspace (blocking: a worker
        thread). That fences this mount off for good."""


class Fencing(Protocol):
    """Who must know that this mount is fenced off (the daemon, daemon/serve.py)."""

    def fence(self, reason: str) -> None:
        """Told once, in the trio thread: a conditional write was refused, or the lease."""


class Flusher(Transfers):
    """Uploads dirty blocks and publishes checkpoints, continuously and on demand."""

    def __init__(
        self,
        meta: Metadata,
        blocks: BlockCache,
        store: ObjectStore,
        cache_dir: Path,
        *,
        flush_delay: float,
        limiter: trio.CapacityLimiter,
        keep: Schedule | None = None,
        filesystem: Filesystem | None = None,
        lease: LeaseCheck | None = None,
        fencing: Fencing | None = None,
        head_etag: str | None = None,
        mount_id: str | None = None,
    ) -> None:
        """A mount's flusher is given its collaborators by daemon/wiring.py (a workspace's
        creation and the tests go without them). `keep`: which checkpoints stay (None: the
        default schedule). `head_etag` and `mount_id`: meta/HEAD's ETag as the daemon
        claimed it at the start, and the mount id HEAD names."""
        self.meta = meta
        self.blocks = blocks
        self.store = store
        self.cache_dir = cache_dir
        self.flush_delay = flush_delay
        self.limiter = limiter
        self.filesystem = filesystem
        self.lease = lease
        self.fencing = fencing
        # meta/HEAD's ETag as this mount last wrote or read it (checkpoint.claim_head), and
        # the mount id HEAD names: a publication replaces HEAD only if it is unchanged since.
        self.head_etag = head_etag
        self.mount_id = mount_id or uuid.uuid4().hex
        self.fenced: LeaseError | None = None
        self.soft_limit = blocks.dirty_limit // 2
        self.seq = int(meta.get_setting("checkpoint_seq") or 0)
        self.known_pages = self._load_pages()
        # Which checkpoints stay, and so which garbage may go (the default schedule: None).
        self.retention = Retention(meta, store, limiter, keep)
        self._published_changes = -1  # unknown at start: publish once to be sure
        if meta.get_setting("clean_unmount") == "1" and blocks.dirty_count == 0:
            # The last run published everything and stopped cleanly: nothing is pending.
            self._published_changes = meta.total_changes
        self._own_changes = 0  # changes the current cycle made itself since its pin
        self._pending_since: float | None = None
        self._lock = trio.Lock()
        self._kick = trio.Event()
        self._started = 0  # cycles started so far
        self._ok_upto = 0  # the start number of the newest cycle that published successfully
        self._cycle_finished = trio.Event()
        # figures for status and tests
        self.last_publish_time: float | None = None
        self.uploaded_blocks = 0
        self.uploaded_bytes = 0
        self.retries = 0
        self.errors = 0  # failed flush cycles
        self.uploading_blocks = 0  # the upload queue: sealed blocks not yet in the store
        self.uploading_bytes = 0
        self.last_error: str | None = None
        # The unmount's flush: its checkpoint carries a bundle, so that the next mount on an
        # empty cache fetches the database in a few requests (checkpoint.py).
        self.final = False
        self._unbundled = False  # this daemon published the newest checkpoint without one

    # -- what is pending -------------------------------------------------------------------

    def not_uploaded(self) -> tuple[int, int]:
        """Bytes and blocks written and not yet in the store: the dirty blocks, less those
        uploaded whose checksums await their commit. (At unmount that commit comes only at
        the end of the cycle, so the dirty figures alone never counted down.)"""
        awaiting_bytes, awaiting = self.blocks.awaiting_commit()
        return (max(0, self.blocks.dirty_bytes - awaiting_bytes),
                max(0, self.blocks.dirty_count - awaiting))

    def pending(self) -> bool:
        """True while something written is not yet covered by a published checkpoint."""
        return self.blocks.dirty_count > 0 or self.meta.total_changes != self._published_changes

    def _due(self) -> bool:
        if not self.pending():
            self._pending_since = None
            return False
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        age = max(now - self._pending_since, self.blocks.oldest_dirty_age())
        return age >= self.flush_delay or self.blocks.dirty_bytes > self.soft_limit

    # -- the loop --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush continuously until cancelled; store errors are retried, never fatal."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit_loop)
            nursery.start_soon(self._flush_when_full)
            task_status.started()
            await self._flush_loop()

    async def _commit_loop(self) -> None:
        """Commit the metadata every COMMIT_INTERVAL, whatever the store is doing.

        Independent of the flush cycles: during a store outage a cycle can retry for minutes,
        and metadata changes (and the files of the blocks they drop) must not wait for it.
        """
        while True:
            try:
                self.meta.flush()
            except (OSError, sqlite3.OperationalError) as e:  # a full disk: try again soon
                log.warning("cannot commit the metadata yet: %s", e)
            if self.blocks.awaiting_sync():  # files go once their commit is durable (and on
                # a full disk their space is what the failing commit above needs)
                try:
                    await trio.to_thread.run_sync(self.meta.sync,
                                                  limiter=self.blocks.local_limiter)
                except OSError as e:
                    log.error("cannot sync the metadata: %s", e)
            await trio.sleep(COMMIT_INTERVAL)

    async def _flush_when_full(self) -> None:
        """A writer found the cache disk full: the dirty blocks must go now, not at the next
        due time (they leave the disk only by an upload)."""
        while True:
            await self.blocks.wait_disk_full()
            self.kick()

    async def _flush_loop(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while True:
            with trio.move_on_after(min(0.5, max(self.flush_delay / 4, 0.05))):
                await self._kick.wait()
            kicked = self._kick.is_set()
            if kicked:
                self._kick = trio.Event()
            if not (kicked or self._due()):
                continue
            try:
                await self.cycle()
                backoff.reset()
            except Exception as e:
                self.last_error = str(e)
                self.errors += 1
                log.warning("flush failed, retrying in %.0fs: %s", backoff.delay, e)
                await backoff.sleep()

    async def sync_now(self) -> None:
        """Return once a cycle that started after this call has published successfully."""
        target = self._started + 1
        while self._ok_upto < target:
            if self.fenced is not None:
                raise self.fenced
            self._kick.set()
            await self._cycle_finished.wait()

    async def flush_all(self, timeout: float) -> None:
        """Upload everything and publish the final checkpoint, or raise FlushError at timeout."""
        deadline = trio.current_time() + timeout
        backoff = Backoff(0.5, 15.0)
        self.final = True
        if self._unbundled:
            self._published_changes = -1  # publish once more, with a bundle
        with trio.move_on_at(deadline):
            while True:
                try:
                    await self.cycle()
                except LeaseError as e:
                    raise FlushError(str(e)) from None
                except Exception as e:
                    self.last_error = str(e)
                    self.errors += 1
                    log.warning("final flush failed, retrying in %.1fs: %s", backoff.delay, e)
                    await backoff.sleep()
                    continue
                if not self.pending():
                    self.meta.set_setting("clean_unmount", "1")
                    self.meta.flush()
                    return
        raise FlushError(
            f"could not upload {self.blocks.dirty_bytes} dirty bytes within {timeout:.0f}s "
            f"({self.last_error}); they stay in {self.cache_dir} and the next mount uploads them"
        )

    # -- one cycle -------------------------------------------------------------------------

    def fence(self, error: LeaseError) -> None:
        """Stop publishing for good: another mount holds the workspace (`fencing` is told)."""
        if self.fenced is None:
            self.fenced = error
            if self.fencing is not None:
                self.fencing.fence(str(error))

    def _claim_head(self) -> None:
        """Learn HEAD's ETag by rewriting it (blocking): for a flusher whose daemon did not
        claim it at the start. HEAD naming any other checkpoint than this cache dir's last
        means another mount published since: fenced."""
        claimed = ckpt.claim_head(self.store, self.mount_id)
        if claimed is None or claimed[0] != self.seq:
            raise LeaseError(f"another mount published to this workspace since checkpoint "
                             f"{self.seq}; {ckpt.FENCED_FIX}")
        self.head_etag = claimed[1]

    def _skip_orphan(self, seq: int) -> None:
        """Checkpoint `seq` exists but is not ours (blocking). If HEAD is still as this mount
        left it, nobody published since: it is the orphan manifest of a fenced mount whose
        HEAD was refused, and the number is skipped (the next cycle publishes `seq + 1`);
        else another mount published it: fenced. Raises either way (the cycle is retried)."""
        try:
            tag: str | None = self.store.get_tagged(ckpt.HEAD_KEY)[1]
        except NoSuchKey:
            tag = None
        if tag is None or tag != self.head_etag:
            raise LeaseError(f"another mount published checkpoint {seq} of this workspace; "
                             f"{ckpt.FENCED_FIX}")
        log.warning("checkpoint %d is a fenced mount's unpublished manifest: skipping the "
                    "number", seq)
        self.seq = seq
        raise RuntimeError(f"checkpoint number {seq} was taken; publishing the next one")

    async def cycle(self) -> None:
        async with self._lock:
            self._started += 1
            number = self._started
            try:
                if self.pending():
                    await self._cycle()
                self._ok_upto = number
            finally:
                self._cycle_finished.set()
                self._cycle_finished = trio.Event()

    def serving(self) -> None:
        """Record, durably, that the cache dir is in use: the mount serves from now on (the
        daemon calls this once mounted, before the first request can arrive), so a crash
        from here on reads as an unclean stop. Until then the cache dir keeps the clean stop
        it had: a start that fails before serving wrote nothing through it, and gives the
        lease back (Daemon.serve)."""
        if self.meta.get_setting("clean_unmount") != "1":
            return
        unchanged = self.meta.total_changes == self._published_changes
        self.meta.set_setting("clean_unmount", "0")
        self.meta.flush()
        if unchanged:  # that setting is no change to publish
            self._published_changes = self.meta.total_changes

    def kick(self) -> None:
        """Start a cycle now instead of at the next due time."""
        self._kick.set()

    def _update_reserve(self) -> None:
        """Keep room on the cache disk for the database, its WAL and the checkpoint copy."""
        size = 0
        for p in (self.meta.path, Path(f"{self.meta.path}-wal")):
            with contextlib.suppress(OSError):
                size += p.stat().st_size
        self.blocks.reserve = max(MIN_RESERVE, 2 * size + MIN_RESERVE // 2)

    async def _cycle(self) -> None:
        if self.fenced is not None:  # nothing it uploads could ever be published
            raise self.fenced
        self._update_reserve()
        if self.filesystem is not None:
            self.filesystem.reap()
        self.meta.flush()
        sealed = self.blocks.seal_all()
        snapshot = ckpt.PinnedSnapshot(self.meta.path)
        changes_at_pin = self.meta.total_changes
        # What changes from now on is pending since now at the earliest: the next cycle is
        # due a flush delay after this pin, not at once. (It was at once: under steady writes
        # cycles ran back to back, each re-uploading most of the database's pages.)
        self._pending_since = time.monotonic()
        self._own_changes = 0
        copy = self.cache_dir / "checkpoint.db"
        uploaded: dict[str, tuple[str, str | None]] = {}  # id -> (checksum, pack)
        try:
            try:
                await trio.to_thread.run_sync(snapshot.copy_to, copy, limiter=self.limiter)
            finally:
                snapshot.release()
            groups, singles = packs.group({b: self.blocks.dirty_length(b) for b in sealed})
            async with trio.open_nursery() as nursery:
                for block_ids in groups + [[b] for b in singles]:
                    nursery.start_soon(self._upload, block_ids, uploaded)
            self.meta.flush()  # commits the checksums: the uploaded blocks' files may go
        finally:
            for block_id in sealed:
                if block_id not in uploaded:
                    self.blocks.retire(block_id, None)
        seq = self.seq + 1
        # Names this publication (workspace.prepare_cache): kept across retries of the same
        # number, since an attempt whose answer was lost may have published it already.
        recorded = self.meta.get_setting("pending_created_ns")
        created_ns = (int(recorded) if recorded and self.meta.get_setting("pending_seq") == str(seq)
                      else time.time_ns())
        self._own(self.meta.set_setting, "pending_seq", str(seq))
        self._own(self.meta.set_setting, "pending_created_ns", str(created_ns))
        self.meta.flush()
        await trio.to_thread.run_sync(self.meta.sync, limiter=self.limiter)
        garbage = await trio.to_thread.run_sync(
            ckpt.finalize, copy, uploaded, seq, limiter=self.limiter
        )
        try:
            if self.lease is not None:
                await trio.to_thread.run_sync(self.lease.check, limiter=self.limiter)
            if self.head_etag is None and self.seq > 0:
                await trio.to_thread.run_sync(self._claim_head, limiter=self.limiter)
            try:
                manifest, self.head_etag = await ckpt.publish(
                    self.store, copy, seq, self.known_pages, self.limiter,
                    created_ns=created_ns, bundle=self.final, head_etag=self.head_etag,
                    mount_id=self.mount_id)
            except ckpt.SeqTaken:
                await trio.to_thread.run_sync(self._skip_orphan, seq, limiter=self.limiter)
                raise
        except LeaseError as e:
            self.fence(e)
            raise
        self._unbundled = (manifest.bundle is None
                           and len(set(manifest.pages)) >= ckpt.BUNDLE_MIN_PAGES)
        self.seq = seq
        self.known_pages = set(manifest.pages)
        # What the store got from this cache dir, should it ever be set aside (conflicts.py)
        await trio.to_thread.run_sync(copy.replace, self.cache_dir / ckpt.PUBLISHED)
        self._own(self.meta.set_setting, "checkpoint_seq", str(seq))
        self._own(self.meta.mark_dead, [i for i, _born in garbage], seq - 1)
        self._save_pages()
        self.last_publish_time = time.time()
        doomed = await self.retention.after_publish(manifest, garbage)
        if doomed and not await self._collect(doomed):
            self.retention.delete_failed()
        self._published_changes = changes_at_pin + self._own_changes
        self.last_error = None
        log.debug("published checkpoint %d: %d blocks, %d garbage, %d deleted", seq,
                  len(sealed), len(garbage), len(doomed))

    def _own(self, write: Callable[..., None], *args: object) -> None:
        """Make a bookkeeping change and count it, so it does not look like unpublished work.

        Runs synchronously: no user change can slip in between the two counter readings, so a
        user's change during a cycle is never mistaken for ours (and never left unpublished).
        """
        before = self.meta.total_changes
        write(*args)
        self._own_changes += self.meta.total_changes - before

    # -- local record of the last manifest's pages -----------------------------------------

    def _pages_file(self) -> Path:
        return self.cache_dir / "pages.json"

    def _load_pages(self) -> set[str]:
        try:
            data = json.loads(self._pages_file().read_text())
        except (OSError, ValueError):
            return set()
        if data.get("seq") != self.seq:
            return set()
        return set(data["pages"])

    def _save_pages(self) -> None:
        tmp = self._pages_file().with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": self.seq, "pages": sorted(self.known_pages)}))
        tmp.replace(self._pages_file())

