"""Packs: the small blocks of a flush cycle go up as one object, and come back as one.

Through real mounts: a tree of small files costs a handful of objects and a handful of
downloads on a fresh machine; a pack stays while any of its blocks is referenced and is
deleted once none is; a workspace written before packs existed (format 1) still mounts,
and one written before pack sizes were recorded (format 2) mounts and is repacked. One
written while timestamps were nanoseconds in one column (format 3) mounts with every time
as it was.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import Workspace, s3_workspace, wait_for
from s3servers import S3Server
from treecompare import assert_same, snapshot

from wsfs.meta import Metadata
from wsfs.meta import checkpoint as ckpt
from wsfs.meta.schema import FORMAT_VERSION, create_schema
from wsfs.store import LocalStore


def small_tree(root: Path, files: int, dirs: int, seed: str) -> None:
    rnd = random.Random(seed)
    for d in range(dirs):
        (root / f"pkg{d}").mkdir()
    for i in range(files):
        content = rnd.randbytes(rnd.randrange(0, 20_000))
        (root / f"pkg{i % dirs}" / f"mod{i}.py").write_bytes(content)


def data_objects(ws: Workspace) -> set[str]:
    root = Path(ws.store_url.removeprefix("file://"))
    return {str(p.relative_to(root)) for p in (root / "data").rglob("*") if p.is_file()}


def test_small_files_travel_as_packs_over_s3(moto_server: S3Server, tmp_path: Path) -> None:
    ws = s3_workspace(moto_server, tmp_path)
    try:
        ws.init()
        mnt = ws.mount()
        small_tree(mnt, files=400, dirs=8, seed="packs")
        expected = snapshot(mnt)
        ws.wsfs("sync", str(mnt))
        bucket, prefix = ws.store_url[5:].split("/", 1)
        listed = moto_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/data/")
        # ~4 MB of small files: a few packs (plus the marker's own object), not 400 objects
        assert 2 <= listed["KeyCount"] <= 8, listed["KeyCount"]
        mnt = ws.remount()  # a fresh machine
        assert_same(expected, snapshot(mnt), what="after a fresh-machine remount")
        downloads = ws.status()["downloads"]
        assert isinstance(downloads, int) and downloads <= listed["KeyCount"], downloads
        ws.unmount()
    finally:
        ws.teardown()


def test_a_pack_lives_while_any_of_its_blocks_does(ws: Workspace) -> None:
    ws.env.update(WSFS_KEEP="0", WSFS_THIN_INTERVAL="0")  # no older checkpoint holds it
    mnt = ws.mount()
    (mnt / "d").mkdir()
    for i in range(20):
        (mnt / "d" / f"f{i}").write_bytes(b"%d" % i * 1000)
    before = data_objects(ws)
    ws.wsfs("sync", str(mnt))
    packs = data_objects(ws) - before
    assert len(packs) == 1, packs  # the twenty files, in one pack

    for i in range(10):
        (mnt / "d" / f"f{i}").unlink()
    (mnt / "d" / "f10").write_bytes(b"rewritten")  # its old block leaves the pack too
    ws.wsfs("sync", str(mnt))
    assert packs <= data_objects(ws)  # nine of its blocks are still referenced
    mnt = ws.remount()  # an empty cache: the survivors come from the pack
    assert (mnt / "d" / "f10").read_bytes() == b"rewritten"
    for i in range(11, 20):
        assert (mnt / "d" / f"f{i}").read_bytes() == b"%d" % i * 1000

    for i in range(11, 20):
        (mnt / "d" / f"f{i}").unlink()
    ws.wsfs("sync", str(mnt))  # publishes, then deletes what the checkpoint dropped
    assert not packs & data_objects(ws)
    ws.unmount()
    r = ws.wsfs("fsck", ws.store_url, "--verify-data", check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def rewrite_newest_checkpoint(ws: Workspace, edit: Callable[[sqlite3.Connection], None]
                              ) -> None:
    """Publish the newest checkpoint again with `edit` applied: an older format, say."""
    store = LocalStore(Path(ws.store_url.removeprefix("file://")))
    seq = ckpt.read_head(store)
    assert seq is not None
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "meta.db"
        trio.run(ckpt.fetch, store, seq, db, trio.CapacityLimiter(4))
        conn = sqlite3.connect(db)
        edit(conn)
        conn.commit()
        conn.close()
        claimed = ckpt.claim_head(store, "test")
        trio.run(lambda: ckpt.publish(store, db, seq + 1, set(), trio.CapacityLimiter(4),
                                      head_etag=claimed[1] if claimed else None))


def test_a_format_1_workspace_is_upgraded(ws: Workspace) -> None:
    """A checkpoint from before packs (no blocks.pack column, format 1) mounts as it is."""
    mnt = ws.mount()
    big = os.urandom(400_000)  # alone in its flush cycle: an object of its own, as in format 1
    (mnt / "old.bin").write_bytes(big)
    ws.unmount()

    def to_format_1(conn: sqlite3.Connection) -> None:
        assert conn.execute("SELECT count(*) FROM blocks WHERE pack IS NOT NULL").fetchone() == (0,)
        conn.execute("DROP INDEX blocks_by_pack")
        conn.execute("ALTER TABLE blocks DROP COLUMN pack")
        conn.execute("DROP TABLE packs")  # format 3
        conn.execute("UPDATE settings SET value='1' WHERE key='format'")

    rewrite_newest_checkpoint(ws, to_format_1)

    ws.fresh_cache()
    mnt = ws.mount()
    assert (mnt / "old.bin").read_bytes() == big
    for i in range(3):
        (mnt / f"new{i}").write_text(f"written after the upgrade {i}\n")
    ws.unmount()
    r = ws.wsfs("fsck", ws.store_url, "--verify-data", check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    ws.fresh_cache()
    mnt = ws.mount()
    assert (mnt / "new2").read_text() == "written after the upgrade 2\n"
    ws.unmount()


@pytest.mark.parametrize("size", [0, 1, 4095, (1 << 20) - 1, 1 << 20, (1 << 20) + 1])
def test_pack_boundary_sizes_round_trip(ws: Workspace, size: int) -> None:
    mnt = ws.mount()
    content = os.urandom(size)
    for i in range(3):
        (mnt / f"f{i}").write_bytes(content)
    mnt = ws.remount()
    for i in range(3):
        assert (mnt / f"f{i}").read_bytes() == content
    ws.unmount()


@pytest.mark.timeout(120)
def test_a_format_2_workspace_is_upgraded_and_repacked(ws: Workspace) -> None:
    """A checkpoint from before the `packs` table (format 2) mounts, and its old packs are
    sized from the store and repacked like any other."""
    mnt = ws.mount(flush_delay=5)
    before = data_objects(ws)
    (mnt / "d").mkdir()
    files = {f"d/f{i}": os.urandom(10_000 + i) for i in range(60)}
    for name, content in files.items():
        (mnt / name).write_bytes(content)
    ws.wsfs("sync", str(mnt))
    (old_pack,) = data_objects(ws) - before
    for i in range(55):
        (mnt / f"d/f{i}").unlink()
        del files[f"d/f{i}"]
    ws.unmount()

    def to_format_2(conn: sqlite3.Connection) -> None:
        conn.execute("DROP TABLE packs")
        conn.execute("UPDATE settings SET value='2' WHERE key='format'")

    rewrite_newest_checkpoint(ws, to_format_2)

    ws.fresh_cache()
    ws.env.update(WSFS_REPACK_INTERVAL="0.5", WSFS_KEEP="0", WSFS_THIN_INTERVAL="0")
    mnt = ws.mount(flush_delay=0.3)
    wait_for("the old pack to be repacked", lambda: old_pack not in data_objects(ws))
    for name, content in files.items():
        assert (mnt / name).read_bytes() == content
    ws.unmount()
    r = ws.wsfs("fsck", ws.store_url, "--verify-data", check=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    ws.fresh_cache()
    mnt = ws.mount()
    for name, content in files.items():
        assert (mnt / name).read_bytes() == content
    ws.unmount()


@pytest.mark.layers
def test_an_upgrade_from_format_1_cut_short_by_a_crash_completes(tmp_path: Path) -> None:
    """The format-1 upgrade commits statement by statement: after a crash between adding the
    column and recording the format, the next open must finish it, not fail on the column
    it finds already there."""
    conn = sqlite3.connect(tmp_path / "meta.db", isolation_level=None)
    create_schema(conn)  # (with the pack column and its index: the crash came after them)
    conn.execute("UPDATE settings SET value='1' WHERE key='format'")
    conn.close()
    meta = Metadata(tmp_path / "meta.db")
    assert meta.get_setting("format") == str(FORMAT_VERSION)
    meta.close()


def to_format_3(conn: sqlite3.Connection) -> None:
    """Turn a database back into format 3: each timestamp in one column of nanoseconds."""
    for t in ("atime", "mtime", "ctime"):
        conn.execute(f"ALTER TABLE inodes ADD COLUMN {t}_ns INTEGER NOT NULL DEFAULT 0")
        conn.execute(f"UPDATE inodes SET {t}_ns = CASE WHEN {t}_sec >= 0"  # 64 bits at most
                     f" THEN {t}_sec * 1000000000 + {t}_nsec"
                     f" ELSE ({t}_sec + 1) * 1000000000 - (1000000000 - {t}_nsec) END")
        for unit in ("sec", "nsec"):
            conn.execute(f"ALTER TABLE inodes DROP COLUMN {t}_{unit}")
    conn.execute("UPDATE settings SET value='3' WHERE key='format'")


# what format 3 could hold: from 1677-09-21 to 2262-04-11, before 1970 and after it
FORMAT_3_TIMES = [-(2**63), -(2**63) + 1, -1_000_000_001, -1, 0, 1, 1_700_000_000_123_456_789,
                  2**63 - 1]


def test_a_format_3_workspace_is_upgraded(ws: Workspace) -> None:
    """A checkpoint whose timestamps are nanoseconds in one column each (format 3) mounts on
    an empty cache with every time as it was, to the nanosecond."""
    mnt = ws.mount()
    (mnt / "d").mkdir()
    for i, t in enumerate(FORMAT_3_TIMES):
        f = mnt / "d" / f"f{i}"
        f.write_bytes(b"%d" % i)
        os.utime(f, ns=(t, FORMAT_3_TIMES[-1 - i]))
    os.symlink("f0", mnt / "d" / "link")
    os.utime(mnt / "d" / "link", ns=(-1, -(2**63)), follow_symlinks=False)
    expected = snapshot(mnt)
    ctimes = {p.name: p.lstat().st_ctime_ns for p in (mnt / "d").iterdir()}
    ws.unmount()
    rewrite_newest_checkpoint(ws, to_format_3)

    ws.fresh_cache()
    mnt = ws.mount()
    assert_same(expected, snapshot(mnt), what="after the upgrade from format 3")
    assert {p.name: p.lstat().st_ctime_ns for p in (mnt / "d").iterdir()} == ctimes
    (mnt / "after").write_bytes(b"written after the upgrade")
    os.utime(mnt / "after", ns=(-(2**63) * 10**9, (2**63 - 1) * 10**9))
    ws.unmount()
    ws.fresh_cache()
    mnt = ws.mount()
    assert (mnt / "after").stat().st_mtime_ns == (2**63 - 1) * 10**9
    assert (mnt / "after").stat().st_atime_ns == -(2**63) * 10**9
    ws.unmount()


@pytest.mark.layers
def test_the_format_3_upgrade_splits_every_time_exactly(tmp_path: Path) -> None:
    """Seconds round down and nanoseconds count up from them, at both ends of 64 bits."""
    conn = sqlite3.connect(tmp_path / "meta.db", isolation_level=None)
    create_schema(conn)
    conn.execute("BEGIN")
    to_format_3(conn)
    for i, t in enumerate(FORMAT_3_TIMES, start=2):
        conn.execute("INSERT INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns,"
                     " ctime_ns) VALUES (?, 32768, 0, 0, 1, ?, ?, ?)",
                     (i, t, FORMAT_3_TIMES[-1 - (i - 2)], t))
    conn.execute("COMMIT")
    conn.close()
    meta = Metadata(tmp_path / "meta.db")
    assert meta.get_setting("format") == str(FORMAT_VERSION)
    for i, t in enumerate(FORMAT_3_TIMES, start=2):
        node = meta.get_inode(i)
        assert node is not None
        assert (node.atime_ns, node.mtime_ns, node.ctime_ns) == \
               (t, FORMAT_3_TIMES[-1 - (i - 2)], t), i
    assert not meta.conn.execute("SELECT 1 FROM inodes WHERE atime_nsec NOT BETWEEN 0 AND"
                                 " 999999999 OR mtime_nsec NOT BETWEEN 0 AND 999999999").fetchall()
    meta.close()
