"""The layers under the filesystem, one at a time and without the kernel: metadata,
checkpoints, the block cache and the flusher's durability order, on the embedded store."""

from __future__ import annotations

import hashlib
import stat
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import trio_wait_for

from wsfs.backoff import Backoff
from wsfs.blocks import BlockCache, object_key
from wsfs.blocks import pack as packs
from wsfs.cachedir import CacheDir
from wsfs.fs.base import drop_blocks
from wsfs.meta import Metadata
from wsfs.meta import checkpoint as ckpt
from wsfs.meta.retention import Schedule
from wsfs.store import LocalStore, NoSuchKey, ObjectStore, TransientStoreError
from wsfs.sync.flusher import Flusher

pytestmark = pytest.mark.layers

BS = 1 << 20


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(0.2, 1.0)
    assert [backoff.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.delay == 0.2

    async def waits() -> float:
        start = trio.current_time()
        await backoff.sleep()
        await backoff.sleep()
        return trio.current_time() - start

    assert trio.run(waits, clock=trio.testing.MockClock(autojump_threshold=0)) == pytest.approx(0.6)


class RecordingStore(LocalStore):
    """A LocalStore that remembers the order of its writes (to check durability order)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data)
        self.puts.append(key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        done = super().put_if_absent(key, data)
        if done:
            self.puts.append(key)
        return done

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        tag = super().put_if_match(key, data, etag)
        if tag is not None:
            self.puts.append(key)
        return tag


def fetched_checkpoint(store: ObjectStore, seq: int, target: Path) -> Metadata:
    """Checkpoint `seq` as a mount on an empty cache dir would fetch it."""
    trio.run(ckpt.fetch, store, seq, target, trio.CapacityLimiter(4))
    return Metadata(target)


def make(tmp_path: Path, keep: str = "0"
         ) -> tuple[RecordingStore, Metadata, BlockCache, Flusher]:
    """A flusher over a directory store, keeping only the newest checkpoint (`keep`) and
    thinning at every publication, unless told otherwise."""
    store = RecordingStore(tmp_path / "store")
    cache = tmp_path / "cache"
    cache.mkdir()
    limiter = trio.CapacityLimiter(4)
    blocks = BlockCache(cache, store, block_size=BS, cache_size=1 << 26, dirty_limit=1 << 26,
                        limiter=limiter)
    meta = Metadata(CacheDir(cache).meta_db, hooks=blocks)
    meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, time.time_ns(), nlink=2, ino=1)
    flusher = Flusher(meta, blocks, store, cache, flush_delay=0, limiter=limiter,
                      keep=Schedule.parse(keep))
    flusher.retention.interval = 0
    return store, meta, blocks, flusher


def add_file(meta: Metadata, blocks: BlockCache, name: bytes, content: bytes) -> int:
    node = meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns(), size=len(content))
    meta.add_entry(1, name, node.id)
    for idx in range(0, max(len(content), 1), BS):
        meta.set_block(node.id, idx // BS, blocks.create(content[idx : idx + BS]))
    return node.id


def test_checkpoint_is_published_after_every_block_it_references(tmp_path: Path) -> None:
    store, meta, blocks, flusher = make(tmp_path)
    add_file(meta, blocks, b"a", b"x" * (4 * BS + 10))
    add_file(meta, blocks, b"b", b"small")
    trio.run(flusher.cycle)
    head_at = store.puts.index(ckpt.HEAD_KEY)
    data_puts = [i for i, k in enumerate(store.puts) if k.startswith("data/")]
    assert len(data_puts) == 2  # a pack of a's four full blocks; a's tail and b in another
    assert max(data_puts) < head_at
    assert blocks.dirty_count == 0 and not flusher.pending()
    rows = meta.conn.execute("SELECT length(csum), pack FROM blocks ORDER BY inode, idx").fetchall()
    assert [r[0] for r in rows] == [64] * 6
    assert len({r[1] for r in rows[:4]}) == 1 and rows[4][1] == rows[5][1] != rows[0][1]


def test_pack_grouping_and_format() -> None:
    sizes = {"big": packs.PACK_MEMBER_MAX + 1, "lone": 10}
    assert packs.group(sizes) == ([], ["big", "lone"])  # a pack of one buys nothing
    many = {f"b{i}": packs.PACK_MEMBER_MAX for i in range(40)}
    groups, singles = packs.group(many)
    assert singles == [] and [b for g in groups for b in g] == list(many)  # order kept
    assert all(len(g) * packs.PACK_MEMBER_MAX <= packs.PACK_TARGET for g in groups)
    members = [("x", b"first"), ("y", b""), ("z", b"third" * 1000)]
    blob, csums = packs.build(members)
    assert packs.split(blob) == {b: (csums[b], data) for b, data in members}
    assert csums["x"] == hashlib.sha256(b"first").hexdigest()
    damaged = bytearray(blob)
    damaged[-1] ^= 1  # the last member's content
    assert {b: d for b, (_, d) in packs.split(bytes(damaged)).items()} == {"x": b"first", "y": b""}
    with pytest.raises(packs.PackCorrupt):
        packs.split(b"garbage")


def test_fetched_checkpoint_reproduces_the_database(tmp_path: Path) -> None:
    store, meta, blocks, flusher = make(tmp_path)
    ino = add_file(meta, blocks, b"f", b"hello")
    meta.set_xattr(ino, b"user.k", b"v")
    trio.run(flusher.cycle)
    assert ckpt.read_head(store) == 1
    restored = fetched_checkpoint(store, 1, tmp_path / "restored.db")
    assert restored.lookup(1, b"f") == ino
    assert restored.get_xattr(ino, b"user.k") == b"v"
    ref = restored.get_block(ino, 0)
    assert ref is not None and ref.csum is not None
    assert store.get(object_key(ref.id)) == b"hello"


def test_unchanged_pages_are_not_uploaded_again(tmp_path: Path) -> None:
    store, meta, blocks, flusher = make(tmp_path)
    for i in range(2000):  # a database of several pages
        add_file(meta, blocks, f"file-{i}".encode(), b"")
    trio.run(flusher.cycle)
    first = sum(1 for k in store.puts if k.startswith(ckpt.PAGE_PREFIX))
    store.puts.clear()
    meta.set_setting("touch", "1")
    trio.run(flusher.cycle)
    second = sum(1 for k in store.puts if k.startswith(ckpt.PAGE_PREFIX))
    assert first >= 4
    assert 1 <= second < first


def test_a_flush_of_a_few_new_files_uploads_few_pages(tmp_path: Path) -> None:
    """New files touch the database where new rows go, not all over it: a checkpoint after
    100 new files (of 5,100) uploads a few pages. An index of every block by its random id
    once made each flush touch pages everywhere, and each checkpoint re-upload ~80 % of
    the database."""
    store, meta, blocks, flusher = make(tmp_path)
    for i in range(5000):
        add_file(meta, blocks, f"old-{i}".encode(), b"x")
    trio.run(flusher.cycle)
    total = sum(1 for k in store.puts if k.startswith(ckpt.PAGE_PREFIX))
    store.puts.clear()
    for i in range(100):
        add_file(meta, blocks, f"new-{i}".encode(), b"y")
    trio.run(flusher.cycle)
    second = sum(1 for k in store.puts if k.startswith(ckpt.PAGE_PREFIX))
    assert total >= 20
    # each b-tree's right edge and its parents: ~10 pages here (with the old index, 24 of 28)
    assert second <= total // 2, f"{second} of {total} pages uploaded again"


def test_garbage_is_deleted_only_after_the_checkpoint_without_it(tmp_path: Path) -> None:
    store, meta, blocks, flusher = make(tmp_path)
    ino = add_file(meta, blocks, b"f", b"old content")
    trio.run(flusher.cycle)
    old = meta.get_block(ino, 0)
    assert old is not None
    # overwrite: the old object becomes garbage in the same transaction
    meta.set_block(ino, 0, blocks.create(b"new content"))
    assert blocks.discard(old.id)
    meta.add_garbage([old.id])
    assert store.head(object_key(old.id)) is not None
    trio.run(flusher.cycle)
    with pytest.raises(NoSuchKey):
        store.get(object_key(old.id))


def test_finalize_refuses_a_checkpoint_with_a_block_not_in_the_store(tmp_path: Path) -> None:
    _, meta, blocks, _ = make(tmp_path)
    add_file(meta, blocks, b"f", b"never uploaded")
    meta.flush()
    snap = ckpt.PinnedSnapshot(meta.path)
    copy = tmp_path / "copy.db"
    snap.copy_to(copy)
    snap.release()
    with pytest.raises(RuntimeError, match="not in the store"):
        ckpt.finalize(copy, {}, 1)


def test_a_block_deleted_between_seal_and_upload_does_not_stop_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under steady deletes some sealed block is always deleted before its upload starts;
    the cycle's snapshot still names it, so it must be uploaded all the same (it was left
    out, and no checkpoint was ever published while a workload kept deleting)."""
    _, meta, blocks, flusher = make(tmp_path)
    keep = add_file(meta, blocks, b"keep", b"k" * 100)
    gone = add_file(meta, blocks, b"gone", b"g" * 100)
    real_copy = ckpt.PinnedSnapshot.copy_to

    def copy_then_delete(snap: ckpt.PinnedSnapshot, dst: Path) -> None:
        real_copy(snap, dst)  # the snapshot is pinned: it names both files' blocks

        def delete() -> None:  # the user, meanwhile, in the trio thread
            meta.begin()
            drop_blocks(meta, blocks, meta.delete_inodes([gone]))
            meta.commit()

        trio.from_thread.run_sync(delete)

    monkeypatch.setattr(ckpt.PinnedSnapshot, "copy_to", copy_then_delete)
    trio.run(flusher.cycle)
    assert flusher.seq == 1
    monkeypatch.setattr(ckpt.PinnedSnapshot, "copy_to", real_copy)
    trio.run(flusher.cycle)  # the next one drops it and collects its object
    assert flusher.seq == 2 and meta.get_block(keep, 0) is not None


class GatedStore(RecordingStore):
    """Holds every data upload until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("data/"):
            self.waiting.set()
            self.gate.wait(30)
        super().put(key, data)


def test_a_write_during_a_cycle_is_not_taken_as_published(tmp_path: Path) -> None:
    _, meta, blocks, flusher = make(tmp_path)
    store = GatedStore(tmp_path / "gated")
    blocks.store = flusher.store = store
    add_file(meta, blocks, b"f", b"data")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher.cycle)
            await trio_wait_for("the cycle to pin and upload", store.waiting.is_set)
            meta.set_setting("user-change", "1")
            store.gate.set()
        assert flusher.pending()
        await flusher.cycle()
        assert not flusher.pending()

    trio.run(main)


def test_recovery_reuploads_or_drops_a_block_with_no_checksum_and_no_local_copy(
    tmp_path: Path,
) -> None:
    """A crash between an upload and the commit of its checksum must not wedge checkpoints.
    A block found again (its object in the store, or its clean copy: it went up in a pack,
    which only the lost commit named) is uploaded again as a new block; recording the one
    found as stored would name `data/<id>`, which a packed block never had."""
    from wsfs.daemon.recovery import boot_id, recover
    from wsfs.meta.schema import referenced_objects

    store, meta, blocks, flusher = make(tmp_path)
    meta.set_setting("boot_id", boot_id())  # the daemon crashed, not the machine
    ino = add_file(meta, blocks, b"f", b"x" * (2 * BS + 5))
    alone, packed, lost = (meta.get_block(ino, i) for i in range(3))
    assert alone is not None and packed is not None and lost is not None
    store.put(object_key(alone.id), b"x" * BS)  # uploaded, checksum never committed
    blocks.clean.keep({packed.id: b"x" * BS})  # uploaded in a pack: only its clean copy
    for ref in (alone, packed, lost):  # none has a local copy any more
        blocks.retire(ref.id, uploaded_at=0)
        (CacheDir(tmp_path / "cache").dirty / ref.id).unlink()
    trio.run(recover, meta, blocks)
    again = [meta.get_block(ino, i) for i in range(2)]
    assert all(r is not None and r.id not in (alone.id, packed.id) for r in again)
    assert meta.get_block(ino, 2) is None  # a hole, not a wedge
    trio.run(flusher.cycle)
    assert ckpt.read_head(store) == 1
    assert all(store.head(object_key(o)) is not None for o in referenced_objects(meta.conn))


@pytest.mark.parametrize("rollback", ["savepoint", "group"])
def test_a_rolled_back_drop_keeps_the_blocks_it_let_go(tmp_path: Path, rollback: str) -> None:
    """A handler that fails after dropping a file's blocks rolls its savepoint back; on a full
    disk SQLite rolls the whole group back by itself. Either way the blocks are referenced
    again and must stay dirty, files and all, not be deleted at the next commit: their file
    would then read EIO, and every checkpoint after would refuse to publish without them."""
    store, meta, blocks, flusher = make(tmp_path)
    content = b"y" * (BS + 7)
    ino = add_file(meta, blocks, b"f", content)
    meta.flush()
    ids = [r.id for r in meta.blocks_in(ino, 0, 1).values()]
    if rollback == "savepoint":
        meta.begin()
    else:
        meta.get_inode(ino)  # a group is open: the drop below writes into it
        meta.conn.execute("BEGIN")
    for ref in meta.remove_blocks_from(ino, 0):
        blocks.discard(ref.id)
    if rollback == "savepoint":
        meta.rollback()
    else:
        meta.conn.rollback()  # what SQLite does on SQLITE_FULL
        meta.get_inode(ino)  # the next call finds the group gone
    assert [r.id for r in meta.blocks_in(ino, 0, 1).values()] == ids
    assert all(blocks.is_writable(b) for b in ids)
    meta.flush()
    trio.run(flusher.cycle)  # uploads them and publishes
    assert ckpt.read_head(store) == 1
    assert all(r.csum is not None for r in meta.blocks_in(ino, 0, 1).values())


@pytest.mark.parametrize("stopped", ["machine", "daemon", "cleanly"])
def test_the_clean_cache_is_emptied_after_a_machine_crash_only(tmp_path: Path,
                                                               stopped: str) -> None:
    """Clean copies are written without fsync: after the machine went down, an entry may be
    on disk without its bytes, and a hit is served unchecked. Recovery empties the cache
    then (the store holds every copy), and only then: not after a crash of the daemon
    alone (its writes were in the page cache), nor after a clean stop."""
    from wsfs.daemon.recovery import boot_id, recover

    _, meta, blocks, _ = make(tmp_path)
    blocks.clean.keep({"c0ffee": b"z" * 5000})
    meta.set_setting("boot_id", "an earlier boot" if stopped == "machine" else boot_id())
    meta.set_setting("clean_unmount", "1" if stopped == "cleanly" else "0")
    trio.run(recover, meta, blocks)
    assert ("c0ffee" in blocks.clean) is (stopped != "machine")
    assert meta.get_setting("boot_id") == boot_id()


def test_a_retried_publication_keeps_the_creation_time_it_recorded(tmp_path: Path) -> None:
    """A cycle whose publish failed after its HEAD may have landed (the answer lost) is
    retried under the same number: it must record the same creation time, or a crash after
    the retry recorded a new one would take the cache dir's own checkpoint for another
    mount's and move the cache dir aside."""
    store, meta, blocks, flusher = make(tmp_path)
    add_file(meta, blocks, b"f", b"data")
    real_put, failing = store.put_if_absent, [True]

    def put(key: str, data: bytes) -> bool:
        done = real_put(key, data)
        if key == ckpt.HEAD_KEY and failing.pop():
            raise TransientStoreError("the answer was lost")
        return done

    store.put_if_absent = put  # type: ignore[method-assign]
    failing.append(True)
    with pytest.raises(TransientStoreError):
        trio.run(flusher.cycle)
    first = meta.get_setting("pending_created_ns")
    failing.append(False)
    trio.run(flusher.cycle)
    assert meta.get_setting("pending_created_ns") == first
    manifest = ckpt.read_manifest(store, int(meta.get_setting("checkpoint_seq") or 0))
    assert str(manifest.created_ns) == first


def test_a_retried_publication_replaces_its_own_unnamed_manifest(tmp_path: Path) -> None:
    """A cycle whose manifest landed but whose HEAD did not (a failure, or a daemon killed
    there) is retried under the same number and creation time with a newer snapshot: the
    manifest, never named by HEAD, is this cache dir's own and is replaced, so HEAD names the
    newer snapshot (If-None-Match alone kept the old one: a crash test lost files)."""
    store, meta, blocks, flusher = make(tmp_path)
    add_file(meta, blocks, b"first", b"1")
    real_put, failing = store.put_if_absent, [True]

    def put(key: str, data: bytes) -> bool:
        if key == ckpt.HEAD_KEY and failing and failing.pop():
            raise TransientStoreError("the store went away before HEAD")
        return real_put(key, data)

    store.put_if_absent = put  # type: ignore[method-assign]
    with pytest.raises(TransientStoreError):
        trio.run(flusher.cycle)
    assert ckpt.read_head(store) is None and store.head(ckpt.manifest_key(1)) is not None
    add_file(meta, blocks, b"second", b"2")
    trio.run(flusher.cycle)
    assert ckpt.read_head(store) == 1
    fetched = fetched_checkpoint(store, 1, tmp_path / "fetched.db")
    assert fetched.lookup(1, b"first") is not None and fetched.lookup(1, b"second") is not None


def test_a_remount_after_a_kill_between_manifest_and_head_publishes_its_newer_snapshot(
        tmp_path: Path) -> None:
    """A daemon killed after its manifest landed and before HEAD named it: the next mount on
    that cache dir (a new flusher, reading the recorded number and creation time) publishes
    that number with what it holds now. Naming the dead daemon's manifest instead lost every
    change made after its snapshot (test_crash: the fresh-cache view differed)."""
    store, meta, blocks, flusher = make(tmp_path)
    add_file(meta, blocks, b"first", b"1")
    trio.run(flusher.cycle)  # checkpoint 1: HEAD is replaced from now on (put_if_match)
    add_file(meta, blocks, b"second", b"2")
    real_replace = store.put_if_match

    def killed(key: str, data: bytes, etag: str) -> str | None:
        raise TransientStoreError("the daemon was killed before HEAD")

    store.put_if_match = killed  # type: ignore[method-assign]
    with pytest.raises(TransientStoreError):
        trio.run(flusher.cycle)
    assert ckpt.read_head(store) == 1 and store.head(ckpt.manifest_key(2)) is not None
    store.put_if_match = real_replace  # type: ignore[method-assign]

    remount = Flusher(meta, blocks, store, tmp_path / "cache", flush_delay=0,
                      limiter=trio.CapacityLimiter(4), keep=Schedule.parse("0"))
    remount.retention.interval = 0
    add_file(meta, blocks, b"third", b"3")  # written through the remount
    trio.run(remount.cycle)
    assert ckpt.read_head(store) == 2
    fetched = fetched_checkpoint(store, 2, tmp_path / "fetched.db")
    assert all(fetched.lookup(1, name) is not None for name in (b"first", b"second", b"third"))
