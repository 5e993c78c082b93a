"""A full cache disk: the cache dir on a 64 MiB tmpfs.

Writers wait while uploads and clean-cache eviction free space; only when the disk is full of
dirty data that cannot be uploaded (the store unreachable through the fault proxy) do they get
ENOSPC; nothing acknowledged (fsync returned) is damaged, the metadata database passes
SQLite's integrity check, and a remount on an empty cache reads every acknowledged byte.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import SMALL_DISK, Workspace, wait_for
from faultproxy import FaultProxy

DISK = SMALL_DISK  # the small_disk fixture's size
FILE = 4 << 20


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def write_synced(path: Path, data: bytes) -> None:
    """Write, fsync and close: when this returns, the bytes are acknowledged."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.timeout(300)
def test_writers_wait_for_uploads_and_eviction(ws: Workspace, small_disk: Path) -> None:
    """2.5 times the disk, written through a mount whose cache sits on it: no ENOSPC."""
    mnt = ws.mount("--cache-size", "1G", cache_dir=small_disk / "cache", flush_delay=0.5)
    files = {}
    lowest = DISK
    start = time.monotonic()
    for i in range(40):
        name = f"f{i:02d}.bin"
        files[name] = payload(name, FILE)
        write_synced(mnt / name, files[name])
        lowest = min(lowest, free_bytes(small_disk))
    took = time.monotonic() - start
    total = sum(map(len, files.values()))
    assert total > 2.4 * DISK
    print(f"wrote {total >> 20} MiB through a {DISK >> 20} MiB cache disk in {took:.1f}s; "
          f"lowest free space {lowest >> 20} MiB")
    assert lowest < 24 << 20, "the disk never filled up: the test proves nothing"
    log = ws.cache.log.read_text()
    assert "cache disk is full" in log, "writers never had to wait"
    ws.unmount()
    assert integrity(ws.cache.meta_db) == "ok"
    ws.fresh_cache()
    mnt = ws.mount()
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name
    ws.unmount()



@pytest.mark.timeout(300)
def test_enospc_only_when_full_of_dirty_data(proxied: tuple[Workspace, FaultProxy],
                                             small_disk: Path) -> None:
    ws, proxy = proxied
    ws.allowed_log_errors.append("cache disk is full of dirty data")
    mnt = ws.mount("--cache-size", "1G", "--enospc-timeout", "3",
                   cache_dir=small_disk / "cache", flush_delay=0.5)
    acked: dict[str, bytes] = {}
    for i in range(4):  # uploaded and kept as clean blocks: eviction frees them later
        name = f"early{i}.bin"
        acked[name] = payload(name, FILE)
        write_synced(mnt / name, acked[name])
    proxy.outage(3600)
    failed = None
    start = time.monotonic()
    for i in range(40):
        name = f"late{i:02d}.bin"
        data = payload(name, FILE)
        try:
            write_synced(mnt / name, data)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            failed = name
            break
        acked[name] = data
    took = time.monotonic() - start
    assert failed is not None, "40 files of 4 MiB fitted on a 64 MiB disk with the store down"
    dirty = int(ws.status()["dirty_bytes"])
    print(f"ENOSPC after {len(acked) - 4} files written during the outage ({took:.1f}s), "
          f"{dirty >> 20} MiB dirty, {free_bytes(small_disk) >> 20} MiB free")
    assert dirty > DISK // 2
    # a second writer fails at once: nothing can free space
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        write_synced(mnt / "more.bin", payload("more", FILE))
    assert exc.value.errno == errno.ENOSPC
    assert time.monotonic() - t0 < 2.5
    # nothing acknowledged is damaged; metadata still works; the database is sound
    for name, data in acked.items():
        assert (mnt / name).read_bytes() == data, name
    (mnt / "dir").mkdir()
    os.rename(mnt / "late00.bin", mnt / "dir" / "late00.bin")
    acked["dir/late00.bin"] = acked.pop("late00.bin")
    assert integrity(ws.cache.meta_db) == "ok"
    # deleting dirty data frees space at once, without the store
    victim = "late01.bin"
    dirty = int(ws.status()["dirty_bytes"])
    os.unlink(mnt / victim)
    del acked[victim]
    wait_for("the deleted file's dirty bytes to go",  # when the kernel forgets the inode
             lambda: int(ws.status()["dirty_bytes"]) <= dirty - FILE, timeout=10)
    write_synced(mnt / "after-delete.bin", payload("after-delete", 1 << 20))
    acked["after-delete.bin"] = payload("after-delete", 1 << 20)
    # the store comes back: everything drains, the unmount succeeds
    proxy.pass_through()
    wait_for("everything to drain", lambda: ws.status()["dirty_bytes"] == 0, timeout=120)
    ws.unmount()
    assert integrity(ws.cache.meta_db) == "ok"
    ws.fresh_cache()
    mnt = ws.mount()
    for name, data in acked.items():
        assert (mnt / name).read_bytes() == data, name
    assert not (mnt / victim).exists()
    ws.unmount()
