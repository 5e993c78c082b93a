"""A mount on an empty cache, fast: checkpoint bundles, the prefetch beside the lease, the
start-up handshake, and the bounded caches behind a big tree.

The bundle tests work on the checkpoint layer with the real directory store (a database file
published and fetched back byte for byte); the others mount through the real command line.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from conftest import Workspace

from wsfs.blocks.clean import CLEAN_DB_CACHE_PAGES, open_clean_cache
from wsfs.cachedir import CacheDir
from wsfs.daemon.workspace import prefetch, prepare_cache
from wsfs.errors import MountError
from wsfs.meta import Metadata
from wsfs.meta import checkpoint as ckpt
from wsfs.meta.db import INODE_CACHE_MAX
from wsfs.meta.history import History
from wsfs.meta.retention import Schedule
from wsfs.meta.superblock import read_superblock
from wsfs.runtime import is_mountpoint
from wsfs.store import LocalStore, open_store


def make_db(path: Path, pages: int) -> bytes:
    """A SQLite database of about `pages` checkpoint pages, mostly incompressible."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v BLOB)")
    conn.executemany("INSERT INTO t VALUES (?)",
                     [(os.urandom(4000),) for _ in range(pages * ckpt.PAGE_SIZE // 4096)])
    conn.commit()
    conn.close()
    return path.read_bytes()


def publish(store: LocalStore, db: Path, seq: int, bundle: bool) -> ckpt.Manifest:
    claimed = ckpt.claim_head(store, "test")
    return trio.run(lambda: ckpt.publish(store, db, seq, set(), trio.CapacityLimiter(4),
                                         bundle=bundle,
                                         head_etag=claimed[1] if claimed else None))[0]


def fetch(store: LocalStore, seq: int, target: Path) -> bytes:
    trio.run(ckpt.fetch, store, seq, target, trio.CapacityLimiter(4))
    return target.read_bytes()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.mark.layers
def test_bundle_fetches_the_same_database(store: LocalStore, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundled checkpoint comes back byte for byte, in ranged reads of a few pages each."""
    monkeypatch.setattr(ckpt, "BUNDLE_PART", 3 * ckpt.PAGE_SIZE)  # several parts
    content = make_db(tmp_path / "src.db", 12)
    manifest = publish(store, tmp_path / "src.db", 1, bundle=True)
    assert manifest.bundle is not None and len(manifest.bundle) == len(set(manifest.pages))
    assert store.head(ckpt.bundle_key(1)) == sum(manifest.bundle)
    assert ckpt.Manifest.decode(store.get(ckpt.manifest_key(1))).bundle == manifest.bundle

    ranges: list[tuple[int, int]] = []
    get_range = store.get_range

    def counting(key: str, start: int, length: int) -> bytes:
        ranges.append((start, length))
        return get_range(key, start, length)

    monkeypatch.setattr(store, "get_range", counting)
    assert fetch(store, 1, tmp_path / "out.db") == content
    assert len(ranges) >= 3 and sum(n for _, n in ranges) == sum(manifest.bundle)


@pytest.mark.layers
def test_small_or_unbundled_checkpoints_have_no_bundle(store: LocalStore,
                                                       tmp_path: Path) -> None:
    make_db(tmp_path / "small.db", ckpt.BUNDLE_MIN_PAGES // 2)
    assert publish(store, tmp_path / "small.db", 1, bundle=True).bundle is None
    make_db(tmp_path / "big.db", 12)
    assert publish(store, tmp_path / "big.db", 2, bundle=False).bundle is None
    assert store.head(ckpt.bundle_key(1)) is None and store.head(ckpt.bundle_key(2)) is None


@pytest.mark.layers
@pytest.mark.parametrize("damage", ["missing", "corrupt", "short"])
def test_a_bad_bundle_falls_back_to_the_pages(store: LocalStore, tmp_path: Path,
                                              damage: str) -> None:
    content = make_db(tmp_path / "src.db", 10)
    publish(store, tmp_path / "src.db", 1, bundle=True)
    key = ckpt.bundle_key(1)
    blob = store.get(key)
    if damage == "missing":
        store.delete(key)
    elif damage == "corrupt":
        store.put(key, blob[:100] + bytes(200) + blob[300:])
    else:
        store.put(key, blob[:-10])
    assert fetch(store, 1, tmp_path / "out.db") == content


@pytest.mark.layers
def test_fsck_reads_the_pages_not_the_bundle(store: LocalStore, tmp_path: Path) -> None:
    """A bundle must not hide a lost page: the next checkpoint reuses it."""
    make_db(tmp_path / "src.db", 10)
    manifest = publish(store, tmp_path / "src.db", 1, bundle=True)
    store.delete(ckpt.page_key(manifest.pages[3]))
    assert fetch(store, 1, tmp_path / "out.db")  # a mount still starts, from the bundle
    with pytest.raises(BaseExceptionGroup):
        trio.run(lambda: ckpt.fetch(store, 1, tmp_path / "fsck.db", trio.CapacityLimiter(4),
                                    use_bundle=False))


@pytest.mark.layers
def test_thinning_deletes_a_bundle_with_its_manifest(store: LocalStore, tmp_path: Path) -> None:
    make_db(tmp_path / "src.db", 10)
    publish(store, tmp_path / "src.db", 1, bundle=True)
    for seq in range(2, 7):
        publish(store, tmp_path / "src.db", seq, bundle=False)
    History().thin(store, Schedule.parse("0"), time.time())  # keeps only the newest
    assert store.head(ckpt.manifest_key(1)) is None
    assert store.head(ckpt.bundle_key(1)) is None
    assert fetch(store, 6, tmp_path / "out.db")


def big_metadata(mnt: Path, files: int = 60) -> None:
    """Enough metadata for a bundle (> BUNDLE_MIN_PAGES pages) without thousands of files:
    large extended attributes live in the database."""
    for i in range(files):
        p = mnt / f"f{i:03d}"
        p.write_bytes(b"x")
        os.setxattr(p, "user.pad", os.urandom(12000))


def test_unmount_bundles_and_an_empty_cache_mount_uses_it(ws: Workspace) -> None:
    """The unmount's checkpoint carries a bundle; a mount on an empty cache reads it (and
    the checkpoint it prefetched while taking the lease) and serves the same tree."""
    mnt = ws.mount()
    big_metadata(mnt)
    ws.unmount()
    store = open_store(ws.store_url)
    seq = ckpt.read_head(store)
    assert seq is not None
    manifest = ckpt.Manifest.decode(store.get(ckpt.manifest_key(seq)))
    assert len(set(manifest.pages)) >= ckpt.BUNDLE_MIN_PAGES
    assert manifest.bundle is not None and store.head(ckpt.bundle_key(seq)) is not None

    mnt = ws.mount(cache_dir=ws.fresh_cache())
    log = ws.cache.log.read_text()
    assert "fetched while taking the lease" in log and "unusable" not in log
    assert not ws.cache.prefetch.exists()
    assert len(os.listdir(mnt)) == 60 + 1  # and the marker
    assert len(os.getxattr(mnt / "f059", "user.pad")) == 12000
    ws.unmount()


def test_an_idle_unmount_bundles_the_last_checkpoint(ws: Workspace) -> None:
    """A mount whose last change was published long before the unmount still leaves a
    bundle behind: the unmount publishes once more."""
    mnt = ws.mount(flush_delay=0.1)
    big_metadata(mnt)
    ws.wsfs("sync", str(mnt))
    store = open_store(ws.store_url)
    synced = ckpt.read_head(store)
    assert synced is not None
    assert ckpt.Manifest.decode(store.get(ckpt.manifest_key(synced))).bundle is None
    ws.unmount()
    seq = ckpt.read_head(store)
    assert seq is not None and seq > synced
    assert ckpt.Manifest.decode(store.get(ckpt.manifest_key(seq))).bundle is not None


def test_gc_deletes_an_orphan_bundle_and_keeps_the_live_one(ws: Workspace) -> None:
    """A writer that crashed between a bundle and its manifest leaves the bundle alone in the
    store: gc deletes it, and keeps the bundle of the checkpoint a fresh mount needs."""
    mnt = ws.mount()
    big_metadata(mnt)
    ws.unmount()
    store = open_store(ws.store_url)
    seq = ckpt.read_head(store)
    assert seq is not None and store.head(ckpt.bundle_key(seq)) is not None
    orphan = ckpt.bundle_key(seq + 1)  # its manifest never came
    store.put(orphan, b"half of a crashed unmount")
    report = json.loads(ws.wsfs("gc", ws.store_url, "--min-age", "0", "--json").stdout)
    assert report["pages_deleted"] >= 1, report
    assert store.head(orphan) is None
    assert store.head(ckpt.bundle_key(seq)) is not None
    mnt = ws.mount(cache_dir=ws.fresh_cache())
    assert len(os.listdir(mnt)) == 60 + 1
    ws.unmount()


def test_a_prefetch_overtaken_by_a_newer_checkpoint_is_not_used(ws: Workspace,
                                                                tmp_path: Path) -> None:
    """The prefetch runs before the lease is ours: if another mount publishes meanwhile,
    prepare_cache must fetch the newer checkpoint, not serve the guess."""
    store = open_store(ws.store_url)
    cache = tmp_path / "late-cache"
    cache.mkdir()
    limiter = trio.CapacityLimiter(4)
    sb = read_superblock(store)
    guessed = trio.run(prefetch, store, sb, cache, limiter)
    assert guessed == ckpt.read_head(store)

    mnt = ws.mount()
    (mnt / "newer").write_text("published after the prefetch")
    ws.unmount()
    newest = ckpt.read_head(store)
    assert newest is not None and newest > guessed

    trio.run(prepare_cache, store, sb, cache, limiter, guessed)
    meta = Metadata(CacheDir(cache).meta_db)
    try:
        assert meta.get_setting("checkpoint_seq") == str(newest)
        assert meta.lookup(1, b"newer") is not None
    finally:
        meta.close()
    assert not CacheDir(cache).prefetch.exists()


def test_a_prefetched_mount_clears_what_an_earlier_run_left(ws: Workspace) -> None:
    """A cache dir without a database may hold another run's leftovers (a stale page list,
    clean blocks): a mount that uses its prefetched checkpoint clears them like one that
    fetches after the lease."""
    ws.cache_dir.mkdir(parents=True)
    ws.cache.clean.mkdir()
    (ws.cache.clean / "stale").write_text("x")
    ws.cache.pages.write_text('{"seq": 1, "pages": ["0" ]}')
    ws.mount()
    assert "fetched while taking the lease" in ws.cache.log.read_text()
    assert not (ws.cache.clean / "stale").exists()
    pages = ws.cache.pages
    assert not pages.exists() or '"0"' not in pages.read_text()
    ws.unmount()


def test_a_daemon_that_fails_while_starting_is_reported(ws: Workspace) -> None:
    """A daemon failing in an unforeseen way while it starts (here: opening its log): one
    sentence naming the reason, with the mount error's exit code, no traceback on the
    terminal, and nothing mounted."""
    ws.cache_dir.mkdir(parents=True)
    ws.cache.log.mkdir()  # opening the log fails
    result = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-dir", str(ws.cache_dir),
                     check=False, timeout=60)
    assert result.returncode == MountError.exit_code, result.stderr
    assert "daemon failed while starting" in result.stderr
    assert str(ws.cache.log) in result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mountpoint(ws.mnt)


def test_the_mount_command_returns_as_soon_as_the_daemon_serves(ws: Workspace) -> None:
    """`wsfs mount` exits at once after the handshake (no interpreter teardown in the way),
    with its exit code 0, and the daemon it leaves behind is the one serving."""
    env = {**os.environ, **ws.env}
    proc = subprocess.run(
        [sys.executable, "-m", "wsfs", "mount", ws.store_url, str(ws.mnt), "--cache-dir",
         str(ws.cache_dir)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (ws.mnt / ".workspace.initialized").exists()
    pid = ws.daemon_pid()
    assert pid is not None and os.path.exists(f"/proc/{pid}")
    ws.unmount()


@pytest.mark.layers
def test_the_inode_cache_stays_under_its_bound(tmp_path: Path) -> None:
    """Every cache in Metadata is bounded by a size, not by the tree: after more inodes than
    the bound are created and read, the caches hold at most the bound."""
    meta = Metadata(tmp_path / "meta.db")
    try:
        root = meta.create_inode(0o40755, 0, 0, 0, nlink=2, ino=1)
        for i in range(INODE_CACHE_MAX + 500):
            node = meta.create_inode(0o100644, 0, 0, 0)
            meta.add_entry(root.id, f"f{i}".encode(), node.id)
            meta.get_inode(node.id)
            meta.parent_of(node.id)
        meta.flush()
        assert len(meta._inodes) <= INODE_CACHE_MAX
        assert len(meta._parents) <= INODE_CACHE_MAX
    finally:
        meta.close()


@pytest.mark.layers
def test_the_clean_cache_maps_no_memory(tmp_path: Path) -> None:
    """diskcache opens a SQLite connection per thread; each must neither map the database
    nor cache more than CLEAN_DB_CACHE_PAGES pages (they held 250 MB at 100,000 files)."""
    cache = open_clean_cache(tmp_path / "clean", 1 << 30)
    try:
        def pragmas() -> tuple[int, int]:
            return (cache._sql("PRAGMA mmap_size").fetchone()[0],
                    cache._sql("PRAGMA cache_size").fetchone()[0])

        assert pragmas() == (0, CLEAN_DB_CACHE_PAGES)
        seen: list[tuple[int, int]] = []
        worker = threading.Thread(target=lambda: seen.append(pragmas()))
        worker.start()
        worker.join()
        assert seen == [(0, CLEAN_DB_CACHE_PAGES)]  # another thread's own connection too
    finally:
        cache.close()
    reopened = open_clean_cache(tmp_path / "clean", 1 << 30)  # settings persist, stay put
    try:
        assert reopened._sql("PRAGMA mmap_size").fetchone()[0] == 0
    finally:
        reopened.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(300)
def test_a_big_flush_holds_few_packs_in_memory(ws: Workspace) -> None:
    """Uploading 256 MiB of dirty blocks: each pack in flight holds its members, the pack and
    the HTTP client's buffers, so their number is capped (PACK_UPLOADS), not the store's 32
    threads' (the daemon peaked at 300 MB for this flush before, 120 MB after)."""
    mnt = ws.mount(flush_delay=600)  # nothing goes up before the sync
    chunk = os.urandom(1 << 20)
    with open(mnt / "big", "wb") as f:
        for i in range(256):
            f.write(chunk[i:] + chunk[:i])
    pid = ws.daemon_pid()
    assert pid is not None
    before = peak_rss_mb(pid)
    ws.wsfs("sync", str(mnt), timeout=240)
    assert ws.status()["dirty_bytes"] == 0
    peak = peak_rss_mb(pid)
    assert peak < before + 160, f"the flush raised the peak RSS {before:.0f} -> {peak:.0f} MB"
    with open(mnt / "big", "rb") as f:
        for i in (0, 100, 255):
            f.seek(i << 20)
            assert f.read(1 << 20) == chunk[i:] + chunk[:i]
