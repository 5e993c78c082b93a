"""Repacking: reclaim the dead space inside packs.

A pack (blocks/pack.py) is garbage only once its last member block is dropped, so a workload
that deletes or rewrites most files of an old pack leaves the pack alive for a few survivors:
the store could hold up to ~4x the live data (one tiny survivor keeps a whole 4 MiB pack).
The Repacker, a task of the mounted daemon beside the flusher, copies the survivors of mostly
dead packs into new packs and lets the old ones go.

One pass, every `interval` seconds (WSFS_REPACK_INTERVAL, default 60; 0 turns it off):
1. scan the block map on a read connection of its own, in a worker thread: each pack's size
   (table `packs`) and its live bytes (its members' lengths, estimated from their files'
   sizes: never below the truth, so a repacked pack is never taken for dead again);
2. pick the packs that are at least half dead (and MIN_DEAD bytes dead) and lost nothing
   since the previous pass (a pack losing members now, say under a running `rm -rf`, is left
   until it settles or dies whole), most dead bytes first, up to BUDGET bytes of survivors;
3. get each survivor's content from the clean cache, or else by downloading the old pack
   once, and check it against the block map's checksum (a survivor that cannot be had
   leaves its whole pack alone: never lose a block whose only copy is the old pack);
4. upload the survivors as new packs under fresh ids (same block ids, same checksums);
5. then, in the trio thread with no await in between (one savepoint), point the survivors
   that are still in their old pack at the new one, record the new pack's size, and put every
   old pack that lost its last member into `garbage`. A survivor deleted or rewritten during
   the upload simply does not move (the new pack holds a dead copy of it; a new pack none of
   whose members moved is garbage at once).

Durability is the flusher's own order, unchanged: the new pack is in the store before any
metadata names it; the next checkpoint names it (the switch is an ordinary change, so the
next cycle publishes it); the old pack is garbage like any other: its run of naming
checkpoints ends before that checkpoint, and it leaves the store only once no kept
checkpoint is in the run (sync/retain.py), so repacking never breaks a kept checkpoint: the
old ones read their blocks from the old pack, the new ones from the new. A crash anywhere
loses nothing: before the switch commits, the metadata (live and published) names the old
pack, which is still in the store, and the new one is an unreferenced object for `wsfs gc`;
after it, the old pack is garbage. A failed pass (a store outage) is abandoned and tried
again a pass later; nothing was switched. While kept checkpoints hold the old pack, the
store holds both copies of the survivors: repacking pays off once the schedule lets those
checkpoints go (after 30 days at most, with the default schedule).

`wsfs gc` stays safe beside a repacking writer. Its argument needs "an object no checkpoint
references never comes back": a pack still only ever holds the blocks it was uploaded with
(repacking writes *new* packs; no block is ever pointed at an existing pack), so an old pack
that left the checkpoints never comes back, and a new pack is a young upload that the grace
period protects until the checkpoint naming it is published (within a cycle, like a flush).
What repacking changes is that a block can move from one pack to another, so two kept
checkpoints may find the same block in two packs; each keeps the one it names.

Work is bounded so that user writes and their durability come first: a pass moves at most
BUDGET bytes, one upload at a time, is skipped while dirty data is piling up, and is given up
after PASS_TIMEOUT. A reader that fetched a block's location just before a switch and reads it
after the old pack's deletion finds the survivor in the clean cache, where the pass put it
(only a cache too small to keep it, or a nearly full cache disk, would make it fail).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3

import trio

from ..blocks import BlockCache, object_key
from ..blocks import pack as packs
from ..config import env_seconds
from ..meta import Metadata
from ..meta.packs import PackUsage, adopt_packs, scan
from ..store import NoSuchKey, ObjectStore

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
DEAD_FRACTION = 0.5  # a pack at least this dead is repacked
MIN_DEAD = 64 << 10  # ...and only if that frees at least this much (a request costs too)
BUDGET = 8 << 20  # bytes of survivors moved per pass, at most (at least one pack)
# Bytes of packs downloaded per pass, at most: survivors are read from whole packs, so a pass
# over many nearly dead packs (a few KiB live in each) downloaded gigabytes for BUDGET, timed
# out, and did the same again at the next pass, never switching anything.
FETCH_BUDGET = 64 << 20
PASS_TIMEOUT = 120.0
HEAD_BATCH = 64  # packs of unknown size (older formats) sized per pass, with one HEAD each


def default_interval() -> float:
    """Seconds between repack passes: $WSFS_REPACK_INTERVAL (0 turns repacking off; tests
    use a second), else DEFAULT_INTERVAL."""
    return env_seconds("WSFS_REPACK_INTERVAL", DEFAULT_INTERVAL)


def choose(usage: list[PackUsage], previous: dict[str, tuple[int, int]],
           budget: int = BUDGET, fetch_budget: int = FETCH_BUDGET) -> list[PackUsage]:
    """The packs worth repacking now, most dead bytes first, up to `budget` live bytes and
    `fetch_budget` bytes of packs to download.

    Only packs that lost nothing since the previous pass (`previous`: id -> (members, live))
    qualify: one still losing members may well die whole without any copying.
    """
    due = [u for u in usage
           if u.size is not None and u.dead >= MIN_DEAD and u.dead >= u.size * DEAD_FRACTION
           and previous.get(u.id) == (u.members, u.live)]
    due.sort(key=lambda u: -u.dead)
    chosen: list[PackUsage] = []
    total = fetched = 0
    for u in due:
        size = u.size or 0
        if chosen and (total + u.live > budget or fetched + size > fetch_budget):
            break
        chosen.append(u)
        total += u.live
        fetched += size
    return chosen


def chunks(members: list[tuple[str, int]], target: int = packs.PACK_TARGET) -> list[list[str]]:
    """Split (id, length) into runs of at most `target` bytes, in order (a run holds at
    least one member)."""
    out: list[list[str]] = []
    filled = 0
    for block_id, length in members:
        if not out or (out[-1] and filled + length > target):
            out.append([])
            filled = 0
        out[-1].append(block_id)
        filled += length
    return out


class Repacker:
    """Moves the survivors of mostly dead packs into new packs (see the module docstring)."""

    def __init__(self, meta: Metadata, blocks: BlockCache, store: ObjectStore, *,
                 interval: float | None = None) -> None:
        """`interval`: seconds between passes (None: `default_interval()`; 0: no pass runs,
        as on a read-only mount, which rewrites nothing in the store)."""
        self.meta = meta
        self.blocks = blocks
        self.store = store
        self.interval = default_interval() if interval is None else interval
        self.fenced = False  # another mount holds the workspace (`fence`)
        self._previous: dict[str, tuple[int, int]] = {}
        # The database's change count at the last scan, and whether that scan found anything
        # worth another look: an idle workspace is not scanned again and again (a scan of
        # 100,000 packed blocks takes ~50 ms of a worker thread).
        self._scanned_at = -1
        self._promising = True
        self._damaged: set[str] = set()  # packs that cannot be repacked (logged once)
        # Before anything changes (the mount does not serve yet): see adopt_packs.
        if adopt_packs(meta.conn, blocks.block_size):
            meta.flush()
        # figures for status and tests
        self.passes = 0
        self.packs_reclaimed = 0  # old packs emptied (now garbage)
        self.moved_bytes = 0  # survivor bytes copied into new packs
        self.reclaimed_bytes = 0  # dead bytes of the emptied packs
        self.uploading_bytes = 0  # a new pack on its way to the store
        self.errors = 0
        self.last_error: str | None = None

    def figures(self) -> dict[str, object]:
        return {"repack_passes": self.passes, "repacked_packs": self.packs_reclaimed,
                "repack_moved_bytes": self.moved_bytes,
                "repack_reclaimed_bytes": self.reclaimed_bytes,
                "repack_uploading_bytes": self.uploading_bytes,
                "repack_errors": self.errors, "repack_last_error": self.last_error}

    def fence(self) -> None:
        """Another mount holds the workspace: no new pack of this one could ever be
        published, so no pass runs again."""
        self.fenced = True

    def busy(self) -> bool:
        """Whether user data should have the store to itself (dirty data is piling up:
        over a quarter of the dirty limit), or the mount is fenced off."""
        return self.fenced or self.blocks.dirty_bytes > self.blocks.dirty_limit // 4

    async def run(self) -> None:
        """A pass every `interval` seconds until cancelled; a failed pass is tried again at
        the next one (nothing was switched)."""
        if self.interval <= 0:
            return
        while True:
            await trio.sleep(self.interval)
            if self.busy():
                continue
            try:
                with trio.move_on_after(PASS_TIMEOUT) as scope:
                    await self.repack_once()
                if scope.cancelled_caught:
                    raise TimeoutError(f"a pass took more than {PASS_TIMEOUT:g}s")
            except Exception as e:
                self.errors += 1
                self.last_error = str(e)
                log.warning("repacking failed, trying again in %gs: %s", self.interval, e)

    async def repack_once(self) -> int:
        """One pass; returns the number of old packs it emptied."""
        self.passes += 1
        self.meta.flush()  # the scan reads what is committed
        changes = self.meta.total_changes
        if changes == self._scanned_at and not self._promising:
            return 0
        usage = await trio.to_thread.run_sync(scan, self.meta.path, self.blocks.block_size,
                                              limiter=self.blocks.limiter)
        self._scanned_at = changes
        await self._learn_sizes(usage)
        usage = [u for u in usage if u.id not in self._damaged]
        chosen = choose(usage, self._previous)
        self._previous = {u.id: (u.members, u.live) for u in usage}
        # Worth another scan even if nothing changes: packs due once they prove settled,
        # sizes still unknown, or packs chosen now (a failed pass leaves them).
        self._promising = bool(choose(usage, self._previous, budget=0)) or any(
            u.size is None and u.id not in self._damaged for u in usage)
        if not chosen:
            return 0
        members: list[tuple[str, str, str, bytes]] = []  # (id, old pack, csum, content)
        for u in chosen:
            got = await self._survivors(u.id)
            if got is not None:
                members += [(b, u.id, c, data) for b, (c, data) in got.items()]
        emptied = 0
        by_id = {m[0]: m for m in members}
        dead = {u.id: u.dead for u in chosen}
        for run in chunks([(m[0], len(m[3])) for m in members]):
            emptied += await self._move([by_id[b] for b in run], dead)
        if emptied:
            log.info("repacked %d packs: %d bytes of live blocks moved", emptied,
                     sum(len(m[3]) for m in members))
        return emptied

    async def _learn_sizes(self, usage: list[PackUsage]) -> None:
        """Ask the store for the sizes the block map lacks (packs uploaded before format 3),
        a few per pass; the object's size counts its header too, a few dozen bytes a member."""
        unknown = [u.id for u in usage if u.size is None and u.id not in self._damaged]
        for pack_id in unknown[:HEAD_BATCH]:
            size = await trio.to_thread.run_sync(self.store.head, object_key(pack_id),
                                                 limiter=self.blocks.clean.fetch_limiter)
            if not self.meta.pack_in_use(pack_id):
                continue
            if size is None:
                self._damaged.add(pack_id)
                log.error("pack %s is missing from the store (run wsfs fsck)", pack_id)
            else:
                self.meta.set_pack_size(pack_id, size)

    async def _survivors(self, pack_id: str) -> dict[str, tuple[str, bytes]] | None:
        """The content of every block living in `pack_id` (id -> (checksum, content)),
        checked against the block map; None if any cannot be had (the pack stays as it is)."""
        wanted = dict(self.meta.pack_members(pack_id))
        clean = self.blocks.clean

        def work() -> dict[str, tuple[str, bytes]]:
            out: dict[str, tuple[str, bytes]] = {}
            for block_id, csum in wanted.items():
                data = clean.content(block_id)
                if data is not None and hashlib.sha256(data).hexdigest() == csum:
                    out[block_id] = (csum, data)
            missing = [b for b in wanted if b not in out]
            if not missing:
                return out
            try:
                found = packs.split(self.store.get(object_key(pack_id)))
            except NoSuchKey:
                raise packs.PackCorrupt("it is missing from the store") from None
            for block_id in missing:
                got = found.get(block_id)
                if got is None or got[0] != wanted[block_id]:
                    raise packs.PackCorrupt(f"block {block_id} does not match its checksum")
                out[block_id] = got
            return out

        try:
            return await trio.to_thread.run_sync(work, limiter=self.blocks.clean.fetch_limiter)
        except packs.PackCorrupt as e:
            if self.meta.pack_in_use(pack_id):  # else it just died whole: nothing to do
                self._damaged.add(pack_id)
                log.error("cannot repack pack %s: %s (run wsfs fsck); it stays as it is",
                          pack_id, e)
            return None

    async def _move(self, run: list[tuple[str, str, str, bytes]], dead: dict[str, int]) -> int:
        """Upload one new pack holding `run` (id, old pack, csum, content), then switch the
        block map to it. Returns the number of old packs this emptied (`dead`: their dead
        bytes, for the figures)."""
        new_id = secrets.token_hex(16)
        blob, csums = packs.build([(m[0], m[3]) for m in run])
        if any(csums[m[0]] != m[2] for m in run):  # _survivors checked them: never happens
            raise RuntimeError("a repacked block does not match its checksum")
        key = object_key(new_id)
        self.uploading_bytes = len(blob)
        try:
            await trio.to_thread.run_sync(self.store.put, key, blob, limiter=self.blocks.limiter)
        except Exception:
            # The put may have landed: nothing references the new object, so it may go.
            try:
                await trio.to_thread.run_sync(self.store.delete, key,
                                              limiter=self.blocks.limiter)
            except Exception as e:
                log.debug("could not delete the unused pack %s: %s", new_id, e)
            raise
        finally:
            self.uploading_bytes = 0
        # The switch: no await from here on.
        olds = sorted({m[1] for m in run})
        self.meta.begin()
        try:
            moved = self.meta.move_to_pack([(m[0], m[1], m[2]) for m in run], new_id)
            if moved:
                self.meta.set_pack_size(new_id, sum(len(m[3]) for m in run))
            else:  # every member died during the upload: nothing will ever name it
                self.meta.add_garbage([new_id])
            emptied = [old for old in olds if not self.meta.pack_in_use(old)]
            self.meta.add_garbage(emptied)
            self.meta.commit()
        except BaseException:
            self.meta.rollback()
            raise
        self.packs_reclaimed += len(emptied)
        self.moved_bytes += sum(len(m[3]) for m in run)
        self.reclaimed_bytes += sum(dead[old] for old in emptied)
        # Readers that looked the old place up just before the switch find them here.
        if self.blocks.room_to_keep(len(blob)):
            try:
                await trio.to_thread.run_sync(self.blocks.clean.keep, {m[0]: m[3] for m in run},
                                              limiter=self.blocks.local_limiter)
            except (OSError, sqlite3.OperationalError) as e:  # it only costs the caching
                log.debug("could not keep clean copies of repacked blocks: %s", e)
        return len(emptied)
