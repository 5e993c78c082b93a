"""Deleted inodes leave the metadata in batches (fs/base.py, REAP_BATCH): an `rm -r` costs a
few statements per batch instead of a transaction per file. Through a real mount: what is
deleted goes, with its xattrs and blocks; what still has a name or an open handle stays; and
a crash before a batch ran loses nothing kept and leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import Workspace, wait_for
from posix_util import meta_rows

from wsfs.fs.base import REAP_BATCH

FILES = REAP_BATCH + 300  # one full batch, and a rest that waits for the delay


def inode_count(ws: Workspace, where: str = "1") -> int:
    """Inodes in the daemon's committed metadata."""
    count = meta_rows(ws, f"SELECT count(*) FROM inodes WHERE {where}")[0][0]
    assert isinstance(count, int)
    return count


def make_tree(root: Path) -> dict[str, bytes]:
    root.mkdir()
    files = {}
    for i in range(FILES):
        d = root / f"d{i % 7}"
        d.mkdir(exist_ok=True)
        data = os.urandom(i % 3000)  # empty files too
        (d / f"f{i}").write_bytes(data)
        files[f"d{i % 7}/f{i}"] = data
    os.setxattr(root / "d0" / "f0", "user.tag", b"x")
    return files


@pytest.mark.timeout(240)
def test_rm_r_deletes_inodes_but_not_what_is_named_or_open(ws: Workspace) -> None:
    mnt = ws.mount()
    base = inode_count(ws)  # the root and the marker
    kept = make_tree(mnt / "kept")
    gone = make_tree(mnt / "gone")
    os.link(mnt / "gone" / "d1" / "f1", mnt / "kept" / "link")  # a second name survives
    ws.wsfs("sync", str(mnt))  # the gone files are uploaded too: their blocks become garbage

    tree_inodes = FILES + 7 + 1  # files, dirs, the tree's root
    with open(mnt / "gone" / "d2" / "f2", "rb") as held:  # an open file outlives its name
        subprocess.run(["rm", "-r", str(mnt / "gone")], check=True, timeout=60)
        assert not (mnt / "gone").exists()
        # The gone tree's inodes go but the linked file's, the open file's and those of the
        # two directories its open handle pins in the kernel (gone/d2/f2).
        wait_for("the deleted inodes to go",
                 lambda: inode_count(ws) == base + tree_inodes + 4, timeout=30)
        assert inode_count(ws, "nlink = 0") == 3
        assert held.read() == gone["d2/f2"]
    wait_for("the closed file's inode to go",
             lambda: inode_count(ws) == base + tree_inodes + 1, timeout=30)
    assert inode_count(ws, "nlink = 0") == 0

    mnt = ws.remount()  # an empty cache: everything kept comes from the store
    for name, data in kept.items():
        assert (mnt / "kept" / name).read_bytes() == data
    assert os.getxattr(mnt / "kept" / "d0" / "f0", "user.tag") == b"x"
    assert (mnt / "kept" / "link").read_bytes() == gone["d1/f1"]
    assert (mnt / "kept" / "link").stat().st_nlink == 1
    assert not (mnt / "gone").exists()
    ws.unmount()
    r = ws.wsfs("fsck", ws.store_url, check=False)
    assert r.returncode == 0 and "orphans" not in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(240)
def test_a_crash_before_the_batch_loses_nothing_kept(ws: Workspace) -> None:
    """SIGKILL right after an rm -r: inodes queued for the batch may still be in the
    metadata, with no name; the next mount deletes them and keeps every other file."""
    ws.env["WSFS_REAP_DELAY"] = "600"  # the rest after the full batch waits until the kill
    mnt = ws.mount(flush_delay=600)
    kept = make_tree(mnt / "kept")
    gone = make_tree(mnt / "gone")
    for name in gone:
        os.unlink(mnt / "gone" / name)
    fd = os.open(mnt, os.O_RDONLY)
    try:
        os.fsync(fd)  # commits the unlinks; the last ones' inodes still wait for their batch
    finally:
        os.close(fd)
    queued = inode_count(ws, "nlink = 0")
    ws.kill()
    del ws.env["WSFS_REAP_DELAY"]
    assert queued >= FILES - REAP_BATCH  # at most one batch went: the kill hit the window

    mnt = ws.mount()
    assert [p for p in (mnt / "gone").rglob("*") if not p.is_dir()] == []
    for name, data in kept.items():
        assert (mnt / "kept" / name).read_bytes() == data
    assert inode_count(ws, "nlink = 0") == 0  # recovery deleted what was queued
    ws.unmount()
    mnt = ws.mount(cache_dir=ws.fresh_cache())
    for name, data in kept.items():
        assert (mnt / "kept" / name).read_bytes() == data
    ws.unmount()
    r = ws.wsfs("fsck", ws.store_url, check=False)
    assert r.returncode == 0 and "orphans" not in r.stdout, r.stdout + r.stderr
