"""Repacking (wsfs/sync/repack.py): the survivors of mostly dead packs move to new packs, and the
old packs leave the store, without ever losing a block.

First without the kernel (the repacker and the flusher on the embedded store, step by step),
then through real mounts on moto: space falls to the live size, every survivor reads back on
an empty cache and fsck --verify-data is clean; a SIGKILL in the middle of a repack and an S3
outage during one lose nothing.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Workspace, s3_workspace, wait_for
from faultproxy import FaultProxy
from s3servers import S3Server
from test_layers import BS, RecordingStore, add_file, make

from wsfs.blocks import BlockCache, object_key
from wsfs.cachedir import CacheDir
from wsfs.fs import Operations
from wsfs.fs.base import drop_blocks
from wsfs.meta import Metadata, schema
from wsfs.meta import packs as packs_usage
from wsfs.meta.packs import PackUsage, pack_usage
from wsfs.meta.retention import Schedule
from wsfs.store import LocalStore
from wsfs.sync import repack
from wsfs.sync.flusher import Flusher
from wsfs.sync.repack import FETCH_BUDGET, Repacker, choose, chunks

INTERVAL = "0.5"  # seconds between repack passes in the mounted tests
# The mounted tests measure what repacking frees when no older checkpoint holds the old pack:
# only the newest is kept, and thinned at every publication (test_retention.py and
# test_snapshots.py repack beside kept checkpoints).
NO_RETENTION = {"WSFS_KEEP": "0", "WSFS_THIN_INTERVAL": "0"}


# -- without the kernel -----------------------------------------------------------------------

def unlink(meta: Metadata, blocks: BlockCache, ino: int) -> None:
    """What the fs layer does when a file's last name goes."""
    meta.begin()
    drop_blocks(meta, blocks, meta.delete_inodes([ino]))
    meta.commit()


@pytest.mark.layers
def test_choose_takes_settled_mostly_dead_packs_most_dead_first() -> None:
    half = PackUsage("half", 4 << 20, 10, 2 << 20)
    mostly = PackUsage("mostly", 4 << 20, 1, 100)
    alive = PackUsage("alive", 4 << 20, 30, 3 << 20)
    tiny = PackUsage("tiny", 50_000, 1, 10)  # dead, but too little to be worth a PUT
    unknown = PackUsage("unknown", None, 1, 10)
    moving = PackUsage("moving", 4 << 20, 2, 200)  # still losing members
    usage = [half, mostly, alive, tiny, unknown, moving]
    previous = {u.id: (u.members, u.live) for u in usage}
    previous["moving"] = (5, 500)
    assert [u.id for u in choose(usage, previous)] == ["mostly", "half"]
    assert choose(usage, {}) == []  # nothing is settled on the first pass
    assert [u.id for u in choose(usage, previous, budget=1000)] == ["mostly"]
    # Survivors are read from whole packs: many nearly dead ones stop at the download budget,
    # not at their few live bytes (a pass that downloads gigabytes times out, again and again).
    nearly_dead = [PackUsage(f"p{i}", 4 << 20, 1, 10_000) for i in range(800)]
    settled = {u.id: (u.members, u.live) for u in nearly_dead}
    assert len(choose(nearly_dead, settled)) == FETCH_BUDGET // (4 << 20)
    assert chunks([("a", 3), ("b", 3), ("c", 3), ("d", 10)], target=6) == [
        ["a", "b"], ["c"], ["d"]]


def data_keys(store: LocalStore) -> dict[str, int]:
    return {k: s for k, s in store.list("data/")}


@pytest.mark.layers
def test_repack_moves_survivors_and_the_old_pack_goes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store, meta, blocks, flusher = make(tmp_path)
    rnd = random.Random("layers")
    files = {f"f{i}".encode(): rnd.randbytes(rnd.randrange(5_000, 30_000)) for i in range(40)}
    inos = {name: add_file(meta, blocks, name, data) for name, data in files.items()}
    trio.run(flusher.cycle)
    (old_pack,) = {r.pack for ino in inos.values() if (r := meta.get_block(ino, 0))}
    assert old_pack is not None
    keep = [b"f3", b"f17", b"f30"]
    for name, ino in inos.items():
        if name not in keep:
            unlink(meta, blocks, ino)
    trio.run(flusher.cycle)
    assert object_key(old_pack) in data_keys(store)  # three survivors keep it alive
    repacker = Repacker(meta, blocks, store, interval=0)
    assert trio.run(repacker.repack_once) == 0  # the first pass only sees how things are
    assert trio.run(repacker.repack_once) == 1
    new_packs = {r.pack for n in keep if (r := meta.get_block(inos[n], 0))}
    assert len(new_packs) == 1 and old_pack not in new_packs
    assert flusher.pending()  # the switch is a change the next checkpoint publishes
    assert object_key(old_pack) in data_keys(store)  # not before that checkpoint
    trio.run(flusher.cycle)
    keys = data_keys(store)
    assert object_key(old_pack) not in keys
    live = sum(len(files[n]) for n in keep)
    assert sum(keys.values()) < live + 4096, (keys, live)
    assert repacker.packs_reclaimed == 1 and repacker.moved_bytes == live
    # a fresh machine reads the survivors from the new pack
    cold = tmp_path / "cold"
    cold.mkdir()
    fresh = BlockCache(cold, store, block_size=BS, cache_size=1 << 26, dirty_limit=1 << 26,
                       limiter=trio.CapacityLimiter(4))
    for name in keep:
        ref = meta.get_block(inos[name], 0)
        assert ref is not None
        got = trio.run(fresh.read, ref.id, ref.csum, ref.pack, 0, BS)
        assert got == files[name]
    assert trio.run(repacker.repack_once) == 0  # the new pack is all alive
    scans: list[int] = []
    real_scan = packs_usage.scan

    def counted_scan(*a: Any) -> Any:
        scans.append(1)
        return real_scan(*a)

    monkeypatch.setattr(repack, "scan", counted_scan)
    for _ in range(3):
        trio.run(repacker.repack_once)
    assert scans == []  # nothing changed, nothing was due: an idle workspace is not scanned
    unlink(meta, blocks, inos[b"f3"])
    trio.run(repacker.repack_once)
    assert scans == [1]


def one_pack_thinned(tmp_path: Path, keep: int = 1
                     ) -> tuple[RecordingStore, Metadata, BlockCache, Flusher, list[int]]:
    """Ten 50 KB files uploaded in one pack, all deleted but the first `keep`, published."""
    store, meta, blocks, flusher = make(tmp_path)
    inos = [add_file(meta, blocks, b"f%d" % i, bytes([i + 1]) * 50_000) for i in range(10)]
    trio.run(flusher.cycle)
    for ino in inos[keep:]:
        unlink(meta, blocks, ino)
    trio.run(flusher.cycle)
    return store, meta, blocks, flusher, inos


@pytest.mark.layers
def test_repack_reads_an_uncached_survivor_from_the_old_pack(tmp_path: Path) -> None:
    store, meta, blocks, flusher, inos = one_pack_thinned(tmp_path)
    old = meta.get_block(inos[0], 0)
    assert old is not None and old.pack is not None
    blocks.clean.clear()  # only the old pack holds the survivor now
    gets: list[str] = []
    real_get = store.get

    def get(key: str) -> bytes:
        gets.append(key)
        return real_get(key)

    store.get = get  # type: ignore[method-assign]
    repacker = Repacker(meta, blocks, store, interval=0)
    trio.run(repacker.repack_once)
    assert trio.run(repacker.repack_once) == 1
    assert gets == [object_key(old.pack)]
    trio.run(flusher.cycle)
    ref = meta.get_block(inos[0], 0)
    assert ref is not None and ref.pack not in (None, old.pack) and ref.csum == old.csum
    assert bytes([1]) * 50_000 in store.get(object_key(ref.pack or ""))


@pytest.mark.layers
def test_a_survivor_deleted_during_the_upload_does_not_move(tmp_path: Path) -> None:
    store, meta, blocks, flusher, inos = one_pack_thinned(tmp_path, keep=2)
    real_put = store.put

    def put_then_delete(key: str, data: bytes) -> None:
        real_put(key, data)
        trio.from_thread.run_sync(unlink, meta, blocks, inos[1])  # the user, meanwhile

    repacker = Repacker(meta, blocks, store, interval=0)
    trio.run(repacker.repack_once)
    store.put = put_then_delete  # type: ignore[method-assign]
    assert trio.run(repacker.repack_once) == 1
    store.put = real_put  # type: ignore[method-assign]
    trio.run(flusher.cycle)
    assert meta.get_block(inos[1], 0) is None
    ref = meta.get_block(inos[0], 0)
    assert ref is not None
    assert len(data_keys(store)) == 1  # the new pack; the old one is gone


@pytest.mark.ops
def test_a_read_that_looked_up_the_old_pack_finds_the_block_in_the_new_one(
        tmp_path: Path) -> None:
    """A read looks a block up, then waits on its download; meanwhile the block is repacked
    and its old pack deleted. The read must find it where it is now, not fail with EIO."""
    store, meta, blocks, flusher, inos = one_pack_thinned(tmp_path)
    stale = meta.get_block(inos[0], 0)  # what the read looked up before the repack
    repacker = Repacker(meta, blocks, store, interval=0)
    trio.run(repacker.repack_once)
    assert trio.run(repacker.repack_once) == 1
    trio.run(flusher.cycle)  # publishes the new pack, then deletes the old one
    assert stale is not None and stale.pack is not None
    assert object_key(stale.pack) not in data_keys(store)
    blocks.clean.clear()  # the download has to come from the store
    ops = Operations(meta, blocks)
    assert trio.run(ops._read_block, inos[0], stale, 10, 5) == bytes([1]) * 5


@pytest.mark.layers
def test_a_failed_upload_switches_nothing(tmp_path: Path) -> None:
    store, meta, blocks, _flusher, inos = one_pack_thinned(tmp_path)
    before = meta.get_block(inos[0], 0)
    repacker = Repacker(meta, blocks, store, interval=0)
    trio.run(repacker.repack_once)
    real_put = store.put

    def failing_put(key: str, data: bytes) -> None:
        real_put(key, data)  # it lands, and then the answer is lost
        raise OSError("connection reset")

    store.put = failing_put  # type: ignore[method-assign]
    with pytest.raises(OSError):
        trio.run(repacker.repack_once)
    store.put = real_put  # type: ignore[method-assign]
    assert before is not None and meta.get_block(inos[0], 0) == before
    assert set(data_keys(store)) == {object_key(before.pack or "")}  # the orphan was deleted
    assert trio.run(repacker.repack_once) == 1


@pytest.mark.layers
def test_a_format_2_database_is_upgraded(tmp_path: Path) -> None:
    """Format 2 had no `packs` table: each pack in use gets a row of unknown size, which the
    repacker learns from the store before it judges the pack."""
    store, meta, _blocks, _flusher, _inos = one_pack_thinned(tmp_path)
    meta.close()
    conn = sqlite3.connect(CacheDir(tmp_path / "cache").meta_db)
    conn.execute("DROP TABLE packs")
    conn.execute("UPDATE settings SET value='2' WHERE key='format'")
    conn.commit()
    schema.upgrade(conn)
    assert conn.execute("SELECT value FROM settings WHERE key='format'").fetchone() == \
           (str(schema.FORMAT_VERSION),)
    assert conn.execute("SELECT count(*), count(size) FROM packs").fetchone() == (1, 0)
    (usage,) = pack_usage(conn, BS)
    assert usage.size is None and usage.members == 1
    conn.close()
    store2, meta2, blocks2, flusher2 = reopen(tmp_path, store)
    repacker = Repacker(meta2, blocks2, store2, interval=0)
    assert trio.run(repacker.repack_once) == 0  # learns the size (HEAD)
    meta2.flush()  # the daemon commits every half second; the scan reads what is committed
    assert trio.run(repacker.repack_once) == 1
    trio.run(flusher2.cycle)
    assert len(data_keys(store)) == 1


def reopen(tmp_path: Path, store: LocalStore
           ) -> tuple[LocalStore, Metadata, BlockCache, Flusher]:
    cache = tmp_path / "cache"
    limiter = trio.CapacityLimiter(4)
    blocks = BlockCache(cache, store, block_size=BS, cache_size=1 << 26, dirty_limit=1 << 26,
                        limiter=limiter)
    meta = Metadata(CacheDir(cache).meta_db, hooks=blocks)
    flusher = Flusher(meta, blocks, store, cache, flush_delay=0, limiter=limiter,
                      keep=Schedule.parse("0"))
    flusher.retention.interval = 0
    return store, meta, blocks, flusher


# -- through real mounts ----------------------------------------------------------------------

def bucket_objects(ws: Workspace, server: S3Server, prefix: str = "data/") -> dict[str, int]:
    """key -> size of the workspace's objects under `prefix`, straight from moto."""
    bucket, ws_prefix = ws.store_url[5:].split("/", 1)
    out: dict[str, int] = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{ws_prefix}/{prefix}"):
        out.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
    return out


def write_tree(mnt: Path, count: int, seed: str) -> dict[str, bytes]:
    rnd = random.Random(seed)
    (mnt / "t").mkdir()
    files = {}
    for i in range(count):
        name = f"t/f{i:03d}"
        files[name] = rnd.randbytes(rnd.randrange(2_000, 20_000))
        (mnt / name).write_bytes(files[name])
    return files


def thin_out(mnt: Path, files: dict[str, bytes], keep_every: int, rewrite: int
             ) -> dict[str, bytes]:
    """Delete all files but every `keep_every`-th; rewrite `rewrite` of the survivors (their
    old blocks die too). Returns the surviving tree."""
    left = {}
    for i, (name, data) in enumerate(sorted(files.items())):
        if i % keep_every:
            (mnt / name).unlink()
        else:
            left[name] = data
    for name in sorted(left)[:rewrite]:
        left[name] = b"rewritten " + name.encode() * 100
        (mnt / name).write_bytes(left[name])
    return left


def check_tree(mnt: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in (mnt / "t").iterdir()) == sorted(n[2:] for n in files)
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name


def fsck_clean(ws: Workspace) -> None:
    r = ws.wsfs("fsck", ws.store_url, "--verify-data", check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def fresh_check(ws: Workspace, files: dict[str, bytes]) -> None:
    """Every surviving file reads back on an empty cache, and fsck checks every byte."""
    ws.fresh_cache()
    mnt = ws.mount()
    check_tree(mnt, files)
    ws.unmount()
    fsck_clean(ws)


def write_one_pack(ws: Workspace, server: S3Server, mnt: Path, seed: str
                   ) -> tuple[dict[str, bytes], str]:
    """Write a 200-file tree in one flush cycle; return it and the key of its pack."""
    before = bucket_objects(ws, server)
    files = write_tree(mnt, 200, seed)
    ws.wsfs("sync", str(mnt))
    (pack,) = [k for k, size in bucket_objects(ws, server).items()
               if k not in before and size > 1_000_000]
    return files, pack


def setup_thinned(ws: Workspace, server: S3Server, *, flush_delay: float = 2.0
                  ) -> tuple[Path, dict[str, bytes], str]:
    """A tree of small files written in one flush cycle (one pack), then mostly deleted or
    rewritten. Returns the mount, the surviving files and the old pack's key."""
    mnt = ws.mount(flush_delay=flush_delay)
    files, old_pack = write_one_pack(ws, server, mnt, "repack")
    left = thin_out(mnt, files, keep_every=10, rewrite=5)
    ws.wsfs("sync", str(mnt))
    return mnt, left, old_pack


def repack_ws(server: S3Server, tmp_path: Path) -> Workspace:
    ws = s3_workspace(server, tmp_path)
    ws.env.update(NO_RETENTION, WSFS_REPACK_INTERVAL=INTERVAL)
    ws.init()
    return ws


@pytest.mark.timeout(180)
def test_repacking_shrinks_the_store_to_the_live_data(moto_server: S3Server,
                                                      tmp_path: Path) -> None:
    ws = repack_ws(moto_server, tmp_path)
    try:
        # setup_thinned's steps, with the pack measured while all of it lives (no pass
        # touches it yet; after the sync that thins it, one may come first on a busy host)
        mnt = ws.mount(flush_delay=2.0)
        files, old_pack = write_one_pack(ws, moto_server, mnt, "repack")
        packed = bucket_objects(ws, moto_server)[old_pack]
        left = thin_out(mnt, files, keep_every=10, rewrite=5)
        ws.wsfs("sync", str(mnt))
        live = sum(len(d) for d in left.values())
        print(f"before repacking: the old pack alone is {packed} bytes for {live} live "
              f"({packed / live:.1f}x)")
        assert packed > 5 * live  # one tenth of the old pack lives, and keeps all of it
        wait_for("the old pack to leave the store",
                 lambda: old_pack not in bucket_objects(ws, moto_server))
        stored = sum(bucket_objects(ws, moto_server).values())
        print(f"after repacking: {stored} data bytes stored for {live} live "
              f"({stored / live:.2f}x)")
        # the marker's own object and the packs' headers are all that is left over
        assert stored < live * 1.1 + 4096, (stored, live)
        st = ws.status()
        assert st["repacked_packs"] == 1 and st["repack_errors"] == 0, st
        du = json.loads(ws.wsfs("du", ws.store_url, "--json").stdout)
        assert du["pack_dead_bytes"] < 4096, du
        check_tree(mnt, left)
        ws.unmount()
        fresh_check(ws, left)
    finally:
        ws.teardown()


def test_du_shows_the_dead_bytes_inside_live_packs(moto_server: S3Server,
                                                   tmp_path: Path) -> None:
    ws = s3_workspace(moto_server, tmp_path)
    ws.env.update(NO_RETENTION, WSFS_REPACK_INTERVAL="0")  # repacking off: dead bytes stay
    ws.init()
    try:
        _mnt, left, old_pack = setup_thinned(ws, moto_server)
        ws.unmount()
        objects = bucket_objects(ws, moto_server)
        du = json.loads(ws.wsfs("du", ws.store_url, "--json").stdout)
        # the old pack, and the one holding the five rewritten files
        assert du["pack_objects"] == 2, du
        assert du["pack_live_bytes"] == sum(len(d) for d in left.values()), du
        packed = du["pack_bytes"]
        assert packed == sum(objects.values()) - min(objects.values()), du  # not the marker
        assert du["pack_dead_bytes"] == packed - du["pack_live_bytes"], du
        assert du["pack_dead_bytes"] > 0.8 * objects[old_pack], du
        text = ws.wsfs("du", ws.store_url).stdout
        assert "dead inside packs" in text, text
    finally:
        ws.teardown()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("when", ["during_upload", "after_switch"])
def test_a_crash_in_the_middle_of_a_repack_loses_nothing(
        proxied: tuple[Workspace, FaultProxy], moto_server: S3Server, when: str) -> None:
    ws, proxy = proxied
    ws.env.update(NO_RETENTION, WSFS_REPACK_INTERVAL=INTERVAL)
    if when == "during_upload":
        mnt = ws.mount(flush_delay=2)
        files, old_pack = write_one_pack(ws, moto_server, mnt, "crash")
        proxy.stall(60, methods=["PUT"])  # from before the deletions: every upload hangs
        left = thin_out(mnt, files, keep_every=10, rewrite=5)
        wait_for("a repack's upload", lambda: ws.status()["repack_uploading_bytes"] > 0)
        published = files  # the deletions never reached a checkpoint
    else:
        # A long flush delay: the switch is made, the checkpoint naming the new pack is
        # seconds away when the daemon dies (the group commit may or may not have run).
        # Passes 2 s apart: the repack comes after the thinned tree's checkpoint.
        ws.env["WSFS_REPACK_INTERVAL"] = "2"
        mnt, left, old_pack = setup_thinned(ws, moto_server, flush_delay=5)
        wait_for("a repack", lambda: ws.status()["repacked_packs"] == 1)
        published = left
    ws.kill(signal.SIGKILL)
    proxy.pass_through()
    ws.env["WSFS_REPACK_INTERVAL"] = INTERVAL
    assert old_pack in bucket_objects(ws, moto_server)  # nothing published without it yet
    crashed = ws.cache_dir
    mnt = ws.mount(cache_dir=ws.fresh_cache())  # another machine: the store as it was left
    check_tree(mnt, published)
    ws.unmount()
    mnt = ws.mount(cache_dir=crashed, flush_delay=0.3)  # the crashed cache dir: recovery
    check_tree(mnt, left)
    wait_for("the old pack to leave the store",
             lambda: old_pack not in bucket_objects(ws, moto_server))
    ws.unmount()
    fresh_check(ws, left)


@pytest.mark.timeout(240)
def test_an_outage_during_repacking_delays_it_and_loses_nothing(
        proxied: tuple[Workspace, FaultProxy], moto_server: S3Server) -> None:
    ws, proxy = proxied
    ws.env.update(NO_RETENTION, WSFS_REPACK_INTERVAL=INTERVAL)
    mnt = ws.mount(flush_delay=2)
    files, old_pack = write_one_pack(ws, moto_server, mnt, "outage")
    ws.unmount()
    ws.fresh_cache()  # the survivors are in no local cache: the repack must download
    mnt = ws.mount(flush_delay=0.3)
    proxy.outage(12)  # from before the deletions: no repack can have run yet
    left = thin_out(mnt, files, keep_every=10, rewrite=5)
    wait_for("a failed repack", lambda: ws.status()["repack_errors"] >= 1, timeout=30)
    assert ws.status()["repacked_packs"] == 0
    proxy.pass_through()
    assert old_pack in bucket_objects(ws, moto_server)
    ws.wsfs("sync", str(mnt))
    wait_for("the old pack to leave the store",
             lambda: old_pack not in bucket_objects(ws, moto_server))
    ws.unmount()
    fresh_check(ws, left)


@pytest.mark.layers
def test_a_damaged_old_pack_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    """A survivor whose only copy is a damaged pack is not 'repacked' from bad bytes."""
    store, meta, blocks, _flusher, inos = one_pack_thinned(tmp_path)
    before = meta.get_block(inos[0], 0)
    assert before is not None and before.pack is not None
    blocks.clean.clear()
    key = object_key(before.pack)
    blob = bytearray(store.get(key))
    blob[2000] ^= 0xFF  # the survivor, first of ten 50 KB members after a ~1 KB header
    store.put(key, bytes(blob))
    repacker = Repacker(meta, blocks, store, interval=0)
    for _ in range(3):
        assert trio.run(repacker.repack_once) == 0
    assert meta.get_block(inos[0], 0) == before
    assert set(data_keys(store)) == {key}
    assert len([r for r in caplog.records if "cannot repack" in r.getMessage()]) == 1
