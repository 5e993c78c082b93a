"""lseek(2) SEEK_DATA/SEEK_HOLE and fallocate(2) through a real mount, against a model.

Every sequence of operations runs on a file in the mount and on a file in /tmp (ext4 here),
and the two must hold the same bytes. Their SEEK_DATA/SEEK_HOLE answers must agree modulo
the block size: wsfs answers per block of its block map (1 MiB), ext4 per 4 KiB. Precisely,
block by block: where the model has a non-zero byte, wsfs has data; where the model has no
data at all (a hole, or a range fallocated and never written, which ext4 keeps unwritten),
wsfs has a hole. A block the model holds as written zeros may be either.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import Workspace, wait_for
from faultproxy import FaultProxy

from wsfs.fs import lowlevel

MiB = 1 << 20
BS = MiB  # the workspace's block size (the default of `wsfs init`)
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

Op = Callable[[int], None]  # an operation on an open file descriptor


def extents(fd: int) -> list[tuple[int, int]]:
    """The data extents SEEK_DATA/SEEK_HOLE report, as (start, end) pairs."""
    size = os.fstat(fd).st_size
    found, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            assert e.errno == errno.ENXIO
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        assert start < end <= size
        found.append((start, end))
        pos = end
    return found


def data_blocks(spans: list[tuple[int, int]]) -> set[int]:
    return {i for start, end in spans for i in range(start // BS, (end - 1) // BS + 1)}


def check_against_model(path: Path, model: Path) -> None:
    """Same bytes, and SEEK_DATA/SEEK_HOLE answers that agree block by block (see above)."""
    data, expected = path.read_bytes(), model.read_bytes()
    assert len(data) == len(expected)
    assert data == expected
    fd, mfd = os.open(path, os.O_RDONLY), os.open(model, os.O_RDONLY)
    try:
        mine, theirs = extents(fd), extents(mfd)
    finally:
        os.close(fd)
        os.close(mfd)
    for start, end in mine:  # whole blocks, but for the end of the file
        assert start % BS == 0 and (end % BS == 0 or end == len(data)), mine
    ours, model_data = data_blocks(mine), data_blocks(theirs)
    for i in range((len(data) + BS - 1) // BS):
        block = expected[i * BS : (i + 1) * BS]
        if block.count(0) != len(block):
            assert i in ours, f"block {i} holds data but SEEK_HOLE says hole: {mine}"
        if i not in model_data:
            assert i not in ours, f"block {i} is a hole in the model: {mine} vs {theirs}"


def apply(ops: list[Op], *paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for op in ops:
                op(fd)
        finally:
            os.close(fd)


def write(off: int, data: bytes) -> Op:
    def op(fd: int) -> None:
        assert os.pwrite(fd, data, off) == len(data)
    return op


def truncate(size: int) -> Op:
    return lambda fd: os.ftruncate(fd, size)


def fallocate(mode: int, off: int, length: int) -> Op:
    """fallocate(2) with a mode (Python's os has posix_fallocate only)."""
    def op(fd: int) -> None:
        if _libc.fallocate(fd, mode, off, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate({mode:#x}, {off}, {length}): {os.strerror(err)}")
    return op


def stored_blocks(path: Path) -> int:
    """The blocks wsfs stores for a file (st_blocks counts them, up to the file's size)."""
    st = path.stat()
    return (st.st_blocks * 512 + BS - 1) // BS


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def write_synced(path: Path, data: bytes, flags: int = os.O_CREAT | os.O_TRUNC) -> None:
    """Write from the start, fsync and close: when this returns, the bytes are acknowledged."""
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:MiB]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("model")
    yield d


def test_seek_data_and_hole_follow_the_block_map(mounted: Workspace, model: Path) -> None:
    """Islands of data in a sparse file: the same answers as ext4's, to the block; the same
    after a remount on an empty cache."""
    ops = [
        write(0, b"head"),
        write(3 * MiB + 100, payload(2 * MiB, 1)),  # blocks 3-5
        write(9 * MiB - 10, b"straddles"),  # blocks 8 and 9
        truncate(14 * MiB + 5),
        write(12 * MiB, payload(100, 2)),
    ]
    f, m = mounted.mnt / "sparse", model / "sparse"
    apply(ops, f, m)
    check_against_model(f, m)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == BS
        assert os.lseek(fd, 100, os.SEEK_HOLE) == BS
        assert os.lseek(fd, BS + 5, os.SEEK_DATA) == 3 * BS
        assert os.lseek(fd, 4 * BS + 7, os.SEEK_DATA) == 4 * BS + 7  # inside data: itself
        assert os.lseek(fd, 3 * BS, os.SEEK_HOLE) == 6 * BS
        assert os.lseek(fd, 13 * BS, os.SEEK_HOLE) == 13 * BS  # inside a hole: itself
        for off in (13 * BS, 14 * MiB + 4):  # the file ends in a hole
            with pytest.raises(OSError) as e:
                os.lseek(fd, off, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):  # at or past the end
            for off in (14 * MiB + 5, 20 * MiB):
                with pytest.raises(OSError) as e:
                    os.lseek(fd, off, whence)
                assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    mounted.remount(wipe_cache=True)
    check_against_model(f, m)
    mounted.unmount()


def test_seek_data_sees_pages_the_kernel_still_holds(mounted: Workspace) -> None:
    """Written and not yet handed over (the writeback cache holds pages for seconds, and
    the kernel asks FUSE_LSEEK without writing them back): still data, never a hole; `cp`
    skips holes, and would copy zeros."""
    f = mounted.mnt / "fresh"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, payload(3 * MiB, 3), 2 * MiB)
        reader = os.open(f, os.O_RDONLY)
        try:
            assert os.lseek(reader, 0, os.SEEK_DATA) == 2 * MiB
            assert os.lseek(reader, 2 * MiB, os.SEEK_HOLE) == 5 * MiB
        finally:
            os.close(reader)
        os.pwrite(fd, b"tail", 9 * MiB)  # and through the writer's own descriptor
        assert os.lseek(fd, 5 * MiB, os.SEEK_DATA) == 9 * MiB
        assert os.lseek(fd, 9 * MiB, os.SEEK_HOLE) == 9 * MiB + 4
    finally:
        os.close(fd)
    mounted.unmount()


def test_fallocate_modes_match_a_local_model(mounted: Workspace, model: Path) -> None:
    """Punched holes free their blocks, zeroed ranges read zeros, allocated ranges extend
    the file: the bytes and the holes ext4 has, on fresh blocks and on uploaded ones (after a
    remount on an empty cache), and again after the next remount."""
    f, m = mounted.mnt / "f", model / "f"
    apply([write(0, payload(10 * MiB, 4)), write(12 * MiB + 200, b"lonely")], f, m)
    assert stored_blocks(f) == 11
    rounds = [
        [fallocate(PUNCH_HOLE | KEEP_SIZE, 2 * MiB, 2 * MiB),  # two whole blocks go
         fallocate(PUNCH_HOLE | KEEP_SIZE, 5 * MiB + 1000, 4000),  # a block keeps the rest
         fallocate(PUNCH_HOLE | KEEP_SIZE, 12 * MiB + 100, 400),  # a block left all zeros
         fallocate(ZERO_RANGE, MiB - 10, 30),  # across a block boundary
         fallocate(ZERO_RANGE | KEEP_SIZE, 7 * MiB, MiB),  # a whole block
         fallocate(0, 13 * MiB, 3 * MiB + 7),  # extends the file with holes
         fallocate(KEEP_SIZE, 20 * MiB, MiB),  # past the end: the size stays
         write(5 * MiB + 2000, b"partly zero, still working")],
        [fallocate(PUNCH_HOLE | KEEP_SIZE, 5 * MiB - 5, 10),  # uploaded blocks: copies
         fallocate(PUNCH_HOLE | KEEP_SIZE, 8 * MiB, MiB),  # an uploaded block goes
         fallocate(ZERO_RANGE, 9 * MiB + 10, 15 * MiB),  # zeroes up to and past the end
         fallocate(PUNCH_HOLE | KEEP_SIZE, 30 * MiB, MiB),  # past the end: nothing
         write(9 * MiB + 5, b"more")],
    ]
    apply(rounds[0], f, m)
    check_against_model(f, m)
    assert f.stat().st_size == 16 * MiB + 7
    assert stored_blocks(f) == 11 - 2 - 1 - 1
    mounted.remount(wipe_cache=True)
    check_against_model(f, m)
    apply(rounds[1], f, m)
    check_against_model(f, m)
    assert f.stat().st_size == 24 * MiB + 10
    assert stored_blocks(f) == 7 - 1
    for mode in (COLLAPSE_RANGE, INSERT_RANGE):  # ext4 can; the kernel's FUSE client refuses
        with pytest.raises(OSError) as e:
            apply([fallocate(mode, BS, BS)], f)
        assert e.value.errno == errno.EOPNOTSUPP
    mounted.remount(wipe_cache=True)
    check_against_model(f, m)
    mounted.unmount()


def test_fallocate_fails_at_once_when_the_cache_disk_cannot_hold_it(
        ws: Workspace, small_disk: Path) -> None:
    """The cache dir on a 64 MiB disk: reserving 1 GiB is ENOSPC at once (not after the
    60 s a writer waits for uploads), posix_fallocate(3) included, and changes nothing;
    16 MiB fit."""
    mnt = ws.mount("--enospc-timeout", "60", cache_dir=small_disk / "cache")
    f = mnt / "reserved"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for op in (fallocate(0, 0, 1 << 30), fallocate(KEEP_SIZE, 0, 1 << 30),
                   fallocate(ZERO_RANGE, 0, 1 << 30),
                   lambda fd: os.posix_fallocate(fd, 0, 1 << 30)):
            start = time.monotonic()
            with pytest.raises(OSError) as e:
                op(fd)
            assert e.value.errno == errno.ENOSPC
            assert time.monotonic() - start < 10
            assert os.fstat(fd).st_size == 0
        free = free_bytes(small_disk)
        os.posix_fallocate(fd, 0, 16 * MiB)
        assert os.fstat(fd).st_size == 16 * MiB
        assert free - free_bytes(small_disk) >= 16 * MiB  # taken at once
        os.pwrite(fd, b"end", 16 * MiB - 3)
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(16 * MiB - 3) + b"end"
    # The room goes back with what it was for: a punched hole, a cut, a deleted file.
    def gives_back(what: str, action: Callable[[], object]) -> None:
        free = free_bytes(small_disk)
        action()
        wait_for(f"{what} to give the room back",
                 lambda: free_bytes(small_disk) - free >= 6 * MiB, timeout=10)

    gives_back("a punched hole", lambda: apply([fallocate(PUNCH_HOLE | KEEP_SIZE, 0, 8 * MiB)], f))
    gives_back("a cut", lambda: os.truncate(f, 0))
    free = free_bytes(small_disk)
    apply([fallocate(KEEP_SIZE, 0, 12 * MiB)], f)
    assert free - free_bytes(small_disk) >= 12 * MiB
    assert f.stat().st_size == 0
    gives_back("the file's deletion", lambda: os.unlink(f))
    ws.unmount()


@pytest.mark.timeout(300)
def test_fallocated_room_stays_for_its_writes_on_a_full_disk(
        proxied: tuple[Workspace, FaultProxy], small_disk: Path) -> None:
    """posix_fallocate(3) takes its room on the cache disk at once: with the store down,
    other writers fill the disk and get ENOSPC, and the fallocated file's writes still
    land; all of it is in the store once the store is back."""
    ws, proxy = proxied
    ws.allowed_log_errors.append("cache disk is full of dirty data")
    mnt = ws.mount("--cache-size", "1G", "--enospc-timeout", "3",
                   cache_dir=small_disk / "cache", flush_delay=0.5)
    f = mnt / "reserved"
    free = free_bytes(small_disk)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 24 * MiB)
    finally:
        os.close(fd)
    assert free - free_bytes(small_disk) >= 24 * MiB, "the disk gave no room"
    assert f.stat().st_size == 24 * MiB
    proxy.outage(3600)
    others: dict[str, bytes] = {}
    for i in range(20):
        name = f"other{i:02d}"
        data = payload(4 * MiB, i)
        try:
            write_synced(mnt / name, data)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            break
        others[name] = data
    else:
        raise AssertionError("80 MiB fitted on a 64 MiB disk with the store down")
    data = payload(24 * MiB, 99)
    write_synced(f, data, flags=0)  # into the room it reserved: no ENOSPC
    assert f.read_bytes() == data
    proxy.pass_through()
    wait_for("everything to drain", lambda: ws.status()["dirty_bytes"] == 0, timeout=120)
    ws.unmount()
    ws.fresh_cache()
    mnt = ws.mount()
    assert (mnt / "reserved").read_bytes() == data
    for name, content in others.items():
        assert (mnt / name).read_bytes() == content, name
    ws.unmount()


def random_ops(rng: random.Random, count: int) -> list[Op]:
    """fsx's mix for the modes both filesystems take: writes, truncates, punched holes,
    zeroed and allocated ranges, at offsets and lengths aligned to a block or not."""
    def where(limit: int) -> int:
        return rng.randrange(limit // BS) * BS if rng.random() < 0.4 else rng.randrange(limit)

    ops: list[Op] = []
    for i in range(count):
        off, length = where(12 * MiB), max(1, where(3 * MiB))
        kind = rng.choice(["write", "write", "truncate", "punch", "zero", "zero_keep",
                           "allocate", "allocate_keep"])
        if kind == "write":
            ops.append(write(off, payload(min(length, MiB), i)))
        elif kind == "truncate":
            ops.append(truncate(off))
        elif kind == "punch":
            ops.append(fallocate(PUNCH_HOLE | KEEP_SIZE, off, length))
        elif kind.startswith("zero"):
            ops.append(fallocate(ZERO_RANGE | (KEEP_SIZE if kind == "zero_keep" else 0),
                                 off, length))
        else:
            ops.append(fallocate(KEEP_SIZE if kind == "allocate_keep" else 0, off, length))
    return ops


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_match_a_local_model(mounted: Workspace, model: Path,
                                               seed: int) -> None:
    """300 random operations, checked against ext4 every 50, and after a remount on an
    empty cache."""
    rng = random.Random(seed)
    f, m = mounted.mnt / "fsx", model / "fsx"
    for _ in range(6):
        apply(random_ops(rng, 50), f, m)
        check_against_model(f, m)
    mounted.remount(wipe_cache=True)
    check_against_model(f, m)
    mounted.unmount()


class _NoHandlers:
    nursery: trio.Nursery | None = None

    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        raise AssertionError("never called")

    async def lseek(self, inode: int, offset: int, whence: int) -> int:
        raise AssertionError("never called")


@pytest.mark.ops
def test_libfuse_gets_the_handlers_only_from_a_session_it_can_find(
        caplog: pytest.LogCaptureFixture) -> None:
    """What fs/lowlevel.py relies on is there (pyfuse3's module keeps its symbol table, and
    its handler table has the slots of libfuse 3.8 and later); without a session (before
    pyfuse3.init) it writes nothing and says why: the mount goes on without them."""
    symbols = lowlevel.elf_symbols(pyfuse3.__file__, {lowlevel.SESSION_SYMBOL,
                                                      lowlevel.OPS_SYMBOL})
    assert set(symbols) == {lowlevel.SESSION_SYMBOL, lowlevel.OPS_SYMBOL}
    assert symbols[lowlevel.OPS_SYMBOL][1] > lowlevel.LSEEK_SLOT * ctypes.sizeof(ctypes.c_void_p)
    with caplog.at_level(logging.WARNING, logger="wsfs.fs.lowlevel"):
        assert lowlevel.add_handlers(_NoHandlers()) is False
    assert "stay unsupported: pyfuse3 has no session yet" in caplog.text
