"""Integrity: every downloaded block is checked against its checksum; `wsfs fsck` without a mount.

The damage is real: bytes flipped in, or deletion of, the data objects of the file:// store
(and a tampered checkpoint for the metadata checks). A damaged file reads as EIO, never as
wrong bytes; other files read normally; the daemon keeps serving and logs which block.
"""

from __future__ import annotations

import errno
import json
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from conftest import Workspace

from wsfs.blocks import pack as packs
from wsfs.meta import checkpoint as ckpt
from wsfs.store import LocalStore

BS = 1 << 20  # the default block size


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def store_dir(ws: Workspace) -> Path:
    return Path(ws.store_url.removeprefix("file://"))


class Checkpoint:
    """The newest checkpoint of a file:// store, opened as a database in a temp dir."""

    def __init__(self, store: LocalStore, tmp: Path) -> None:
        self.store = store
        self.seq = ckpt.read_head(store)
        assert self.seq is not None
        self.path = tmp / "meta.db"
        trio.run(ckpt.fetch, store, self.seq, self.path, trio.CapacityLimiter(4))
        self.conn = sqlite3.connect(self.path, isolation_level=None)

    def inode(self, path: str) -> int:
        ino = 1
        for name in path.strip("/").split("/"):
            row = self.conn.execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                                    (ino, name.encode())).fetchone()
            assert row is not None, path
            ino = row[0]
        return ino

    def block_keys(self, path: str) -> list[str]:
        """The store object of each block of a file: its own, or the pack holding it."""
        rows = self.conn.execute("SELECT coalesce(pack, id) FROM blocks WHERE inode=? "
                                 "ORDER BY idx", (self.inode(path),)).fetchall()
        return [f"data/{r[0][:2]}/{r[0]}" for r in rows]

    def flip_block(self, path: str, idx: int) -> None:
        """Flip one byte in the middle of a block's content in the store, wherever it lives:
        an object of its own, or its stretch of a pack (the pack's other members intact)."""
        block_id, pack = self.conn.execute("SELECT id, pack FROM blocks WHERE inode=? AND idx=?",
                                           (self.inode(path), idx)).fetchone()
        obj = Path(self.store.root) / f"data/{(pack or block_id)[:2]}/{pack or block_id}"
        blob = bytearray(obj.read_bytes())
        pos, length = 0, len(blob)
        if pack is not None:
            start = len(packs.MAGIC) + 4
            pos = start + int.from_bytes(blob[len(packs.MAGIC):start], "big")
            for member, length, _ in json.loads(blob[start:pos]):
                if member == block_id:
                    break
                pos += length
            else:
                raise AssertionError(f"{path} block {idx} is not in its pack")
        blob[pos + length // 2] ^= 0xFF
        obj.write_bytes(bytes(blob))

    def publish_as_next(self) -> None:
        """Publish this (tampered) database as the store's newest checkpoint."""
        self.conn.close()
        assert self.seq is not None
        seq = self.seq + 1
        claimed = ckpt.claim_head(self.store, "tampering")
        trio.run(lambda: ckpt.publish(self.store, self.path, seq, set(),
                                      trio.CapacityLimiter(4),
                                      head_etag=claimed[1] if claimed else None))


@pytest.fixture
def checkpoint(ws: Workspace) -> Iterator[Callable[[], Checkpoint]]:
    with tempfile.TemporaryDirectory() as tmp:
        n = 0

        def open_newest() -> Checkpoint:
            nonlocal n
            n += 1
            d = Path(tmp) / str(n)
            d.mkdir()
            return Checkpoint(LocalStore(store_dir(ws)), d)

        yield open_newest


# Written together, a.bin, c.bin and d/e.txt go up in packs (blocks/pack.py); b.bin is
# written alone in its own flush cycle, so it is an object of its own.
FILES = {"a.bin": 2 * BS + 12345, "c.bin": BS + 1, "d/e.txt": 5000, "b.bin": 300_000}


def write_tree(ws: Workspace) -> dict[str, bytes]:
    mnt = ws.mount()
    (mnt / "d").mkdir()
    files = {}
    for name, size in FILES.items():
        files[name] = payload(name, size)
        if name == "b.bin":
            ws.wsfs("sync", str(mnt))
        (mnt / name).write_bytes(files[name])
    ws.unmount()
    return files


def fsck(ws: Workspace, *args: str) -> tuple[int, str]:
    r = ws.wsfs("fsck", ws.store_url, *args, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout + r.stderr


def test_damaged_blocks_give_eio_for_that_file_only(ws: Workspace,
        checkpoint: Callable[[], Checkpoint]) -> None:
    files = write_tree(ws)
    cp = checkpoint()
    a_ids = [r[0] for r in cp.conn.execute("SELECT id FROM blocks WHERE inode=? ORDER BY idx",
                                           (cp.inode("a.bin"),))]
    b_keys = cp.block_keys("b.bin")
    assert len(a_ids) == 3 and len(b_keys) == 1
    assert b_keys[0].endswith(cp.conn.execute("SELECT id FROM blocks WHERE inode=?",
                                              (cp.inode("b.bin"),)).fetchone()[0])
    cp.flip_block("a.bin", 1)  # the middle block of a.bin: same size, wrong bytes
    (store_dir(ws) / b_keys[0]).unlink()  # b.bin's only block: gone
    ws.allowed_log_errors += ["does not match its checksum", "is missing from the store"]
    ws.fresh_cache()
    mnt = ws.mount()  # a fresh machine: every block is downloaded

    with open(mnt / "a.bin", "rb") as f:
        assert f.read(BS) == files["a.bin"][:BS]  # block 0 is intact and readable
        with pytest.raises(OSError) as exc:
            f.seek(BS)
            f.read(BS)
        assert exc.value.errno == errno.EIO
        f.seek(2 * BS)
        assert f.read() == files["a.bin"][2 * BS :]  # so is block 2
    for name in ("a.bin", "b.bin"):
        with pytest.raises(OSError) as exc:
            (mnt / name).read_bytes()
        assert exc.value.errno == errno.EIO, name
    for name in ("c.bin", "d/e.txt"):
        assert (mnt / name).read_bytes() == files[name]
    # the daemon is alive and still writes
    (mnt / "new.txt").write_text("still here\n")
    assert sorted(p.name for p in mnt.iterdir()) == sorted(
        [".workspace.initialized", "a.bin", "b.bin", "c.bin", "d", "new.txt"])
    log = ws.cache.log.read_text()
    assert f"block {a_ids[1]} does not match its checksum" in log
    assert f"block {b_keys[0].rsplit('/', 1)[1]} is missing from the store" in log
    ws.unmount()


def test_fsck_clean_and_damaged_data(ws: Workspace,
        checkpoint: Callable[[], Checkpoint]) -> None:
    write_tree(ws)
    code, out = fsck(ws, "--verify-data")
    assert code == 0, out
    assert "clean" in out and "DAMAGED" not in out
    # an object nothing references is garbage, not damage
    stray = store_dir(ws) / "data" / "ff" / ("ff" * 16)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left over")
    code, out = fsck(ws)
    assert code == 0, out
    assert "1 unreferenced data objects (9 bytes)" in out

    cp = checkpoint()
    cp.flip_block("a.bin", 1)
    (store_dir(ws) / cp.block_keys("b.bin")[0]).unlink()
    # without --verify-data only what is missing is seen; the exit code says "damaged"
    code, out = fsck(ws)
    assert code == 9, out
    assert "/b.bin: block 0" in out and "missing" in out
    assert "/a.bin" not in out and "/c.bin" not in out
    # with it, the corrupt block too, and nothing else
    code, out = fsck(ws, "--verify-data")
    assert code == 9, out
    damaged = [ln for ln in out.splitlines() if ln.startswith("DAMAGED")]
    assert len(damaged) == 2, out
    assert any("/a.bin: block 1" in ln and "checksum" in ln for ln in damaged), out
    assert any("/b.bin: block 0" in ln for ln in damaged), out
    assert "2 damaged files" in out
    assert "is damaged" in out  # the one-sentence error on stderr


def test_a_damaged_pack_member_fails_only_its_file(ws: Workspace,
        checkpoint: Callable[[], Checkpoint]) -> None:
    """Files written together share packs: bytes flipped in one member's content make that
    file (alone) unreadable; a lost pack loses exactly the files with a block in it."""
    files = write_tree(ws)
    cp = checkpoint()
    e_pack = cp.block_keys("d/e.txt")[0]
    sharing = [n for n in FILES if n != "d/e.txt" and e_pack in cp.block_keys(n)]
    assert sharing, "d/e.txt shares its pack with the files written beside it"
    cp.flip_block("d/e.txt", 0)
    ws.allowed_log_errors += ["does not match its checksum"]
    ws.fresh_cache()
    mnt = ws.mount()
    with pytest.raises(OSError) as exc:
        (mnt / "d" / "e.txt").read_bytes()
    assert exc.value.errno == errno.EIO
    for name in ("a.bin", "b.bin", "c.bin"):
        assert (mnt / name).read_bytes() == files[name], name
    ws.unmount()
    code, out = fsck(ws, "--verify-data")
    assert code == 9, out
    damaged = [ln for ln in out.splitlines() if ln.startswith("DAMAGED")]
    assert len(damaged) == 1 and "/d/e.txt: block 0" in damaged[0] and "pack" in damaged[0], out

    (store_dir(ws) / e_pack).unlink()
    code, out = fsck(ws)
    assert code == 9, out
    for name in FILES:
        assert (f"/{name}: block" in out) == (name == "d/e.txt" or name in sharing), (name, out)
    assert f"{1 + len(sharing)} damaged files" in out


def test_fsck_metadata_damage(ws: Workspace,
        checkpoint: Callable[[], Checkpoint]) -> None:
    """A checkpoint with a dangling entry, a wrong link count and a lost inode."""
    write_tree(ws)
    cp = checkpoint()
    c_ino, e_ino = cp.inode("c.bin"), cp.inode("d/e.txt")
    d_ino = cp.inode("d")
    cp.conn.execute("DELETE FROM inodes WHERE id=?", (e_ino,))  # d/e.txt now dangles
    cp.conn.execute("UPDATE inodes SET nlink=3 WHERE id=?", (c_ino,))
    cp.conn.execute("INSERT INTO inodes (mode, uid, gid, size, nlink, atime_sec, atime_nsec,"
                    " mtime_sec, mtime_nsec, ctime_sec, ctime_nsec)"
                    " VALUES (?, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)", (0o100644,))
    cp.conn.execute("UPDATE inodes SET nlink=5 WHERE id=?", (d_ino,))
    cp.publish_as_next()
    code, out = fsck(ws)
    assert code == 9, out
    assert "/d/e.txt: dangling entry" in out
    assert "/c.bin: link count 3, should be 1" in out
    assert "/d: link count 5, should be 2" in out
    assert "no entry names it (lost)" in out
    # e.txt's block is now referenced by nothing that exists: reported, not damage
    assert "which is not a file" in out


def test_fsck_unreadable_checkpoint_and_bad_store(ws: Workspace, tmp_path: Path) -> None:
    write_tree(ws)
    head = json.loads((store_dir(ws) / "meta" / "HEAD").read_bytes())
    manifest = store_dir(ws) / "meta" / "manifests" / f"{head['seq']:012d}.json"
    pages = json.loads(manifest.read_bytes())["pages"]
    (store_dir(ws) / "meta" / "pages" / pages[0]).unlink()
    code, out = fsck(ws)
    assert code == 9, out
    assert f"checkpoint {head['seq']} cannot be read" in out
    # no workspace at all: the usual one-sentence error and its exit code
    r = ws.wsfs("fsck", f"file://{tmp_path / 'nothing'}", check=False)
    assert r.returncode == 4 and "holds no wsfs workspace" in r.stderr, r.stderr


def test_mount_on_a_damaged_checkpoint_is_refused_clearly(ws: Workspace) -> None:
    """A fresh machine cannot fetch a checkpoint with a corrupt page: one sentence, exit 9."""
    store_dir = Path(ws.store_url.removeprefix("file://"))
    pages = sorted((store_dir / "meta" / "pages").iterdir())
    assert pages
    for page in pages:
        page.write_bytes(b"not a page")
    r = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-dir", str(ws.cache_dir),
                check=False)
    assert r.returncode == 9, r.stderr
    assert "damaged" in r.stderr and "wsfs fsck" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fsck_and_du_beside_a_busy_mount_find_nothing_missing(ws: Workspace) -> None:
    """A mount publishes checkpoints while fsck or du reads one, and deletes what the older
    ones named (garbage) once a newer one is out: that is not damage. Here a writer rewrites
    files while checkpoints go out every fraction of a second."""
    mnt = ws.mount(flush_delay=0.05)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            (mnt / f"f{i % 30}").write_bytes(random.randbytes(3000 + i % 5000))
            i += 1
            time.sleep(0.005)  # the point: a steady churn, not a busy loop

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(3):
            code, out = fsck(ws, "--verify-data")
            assert code == 0, out
            r = ws.wsfs("du", ws.store_url, "--json", check=False)
            assert r.returncode == 0 and json.loads(r.stdout)["missing_objects"] == 0, r.stdout
    finally:
        stop.set()
        writer.join()
    ws.unmount()
