"""The kernel's page cache against writes that bypass it (O_DIRECT): see wsfs/fs/coherence.py.

wsfs keeps a file's cached pages across opens, so a direct write must leave no page behind
that holds what it replaced: buffered readers of the file see the write once it completed.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import pytest
import trio
from posix_util import KernelAio, d_fixture, shared_fixture  # noqa: F401
from test_fsync import BS, make_ops

CHUNK = 64 * 1024
SIZE = 16 * CHUNK
ROUNDS = 300


class Readers:
    """Threads reading a file through the page cache until stopped: the chunk at `target`,
    over and over (the writer points it at the chunk it writes next)."""

    def __init__(self, path: Path, n: int) -> None:
        self.stop = threading.Event()
        self.reads = 0
        self.target = 0
        self.threads = [threading.Thread(target=self._run, args=(path,)) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            while not self.stop.is_set():
                os.pread(fd, CHUNK, self.target)
                self.reads += 1
        finally:
            os.close(fd)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.mark.timeout(120)
def test_buffered_readers_see_async_direct_writes(d: Path) -> None:
    """Each asynchronous direct write, once completed, is what a buffered read returns.

    The kernel drops the written range's pages before it sends the write, but not after an
    asynchronous one completes: a reader that the daemon answered in between cached the old
    bytes. Before the fix, 6 % to 50 % of the writes here left such a page.
    """
    f = d / "f"
    f.write_bytes(bytes(SIZE))  # within the size: the kernel keeps the writes asynchronous
    readers = Readers(f, 3)
    aio = KernelAio()
    wfd = os.open(f, os.O_RDWR | os.O_DIRECT)
    rfd = os.open(f, os.O_RDONLY)
    stale = []
    try:
        for gen in range(1, ROUNDS + 1):
            off = gen * CHUNK % SIZE
            data = bytes([gen % 251 + 1]) * CHUNK
            readers.target = off
            assert aio.pwrite(wfd, data, off) == CHUNK
            if os.pread(rfd, CHUNK, off) != data:
                stale.append(gen)
    finally:
        readers.close()
        os.close(rfd)
        os.close(wfd)
        aio.close()
    assert readers.reads > ROUNDS  # the readers did race the writes
    assert not stale, f"{len(stale)} of {ROUNDS} direct writes left stale cached pages"
    # what the page cache holds is what the file holds
    dfd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(dfd, SIZE, 0) == f.read_bytes()
    finally:
        os.close(dfd)


@pytest.mark.timeout(120)
def test_direct_writer_beside_buffered_writer_and_mapping(d: Path) -> None:
    """Writebacks through the direct handle never wait for their own invalidation.

    The kernel writes a file's dirty pages back through any of its writable handles, the
    direct one too, and a page under writeback is what an invalidation waits for: a direct
    write that waited for it before answering would never be answered. A buffered writer
    opened before the direct one (so the writebacks go through the direct handle), then a
    shared mapping of the direct handle itself: both finish, and every write lands.
    (A guard for the fix's own hazard: the code before the fix passes it as well.)
    """
    f = d / "f"
    f.write_bytes(bytes(SIZE))
    readers = Readers(f, 2)
    aio = KernelAio()
    expect = bytearray(SIZE)
    try:
        bfd = os.open(f, os.O_RDWR)
        dfd = os.open(f, os.O_RDWR | os.O_DIRECT)  # the newest writable handle
        started = time.monotonic()
        for i in range(64):
            boff, doff = i % 8 * CHUNK, (8 + i % 8) * CHUNK
            readers.target = doff
            os.pwrite(bfd, bytes([i + 1]) * CHUNK, boff)
            aio.pwrite(dfd, bytes([i + 101]) * CHUNK, doff)
            expect[boff:boff + CHUNK] = bytes([i + 1]) * CHUNK
            expect[doff:doff + CHUNK] = bytes([i + 101]) * CHUNK
            if i % 8 == 7:
                os.fsync(bfd)  # writebacks now, while the direct handle is open
        os.close(bfd)
        assert time.monotonic() - started < 30
        with mmap.mmap(dfd, SIZE, mmap.MAP_SHARED) as m:
            m[0:4096] = b"m" * 4096
            expect[0:4096] = b"m" * 4096
            aio.pwrite(dfd, b"d" * CHUNK, 8 * CHUNK)
            expect[8 * CHUNK:9 * CHUNK] = b"d" * CHUNK
            m.flush()  # the writeback of the mapping goes through the direct handle
        os.close(dfd)
    finally:
        readers.close()
        aio.close()
    assert f.read_bytes() == bytes(expect)


@pytest.mark.ops
def test_read_waiting_across_a_direct_write_reads_again(tmp_path: Path) -> None:
    """A read that fetched the old bytes before a direct write was applied, and answers after
    it (it waited for a download meanwhile), is started again: its answer would be cached
    after the write's invalidation."""
    ops, fh = make_ops(tmp_path)
    ino = ops._handles[fh]
    dropped: list[int] = []
    ops.direct._invalidate = dropped.append

    async def main() -> None:
        await ops.write(fh, 0, b"old!" * 1024)
        direct = int((await ops.open(ino, os.O_RDWR | os.O_DIRECT, None)).fh)  # type: ignore[arg-type]
        real_read = ops.blocks.read
        downloading = trio.Event()
        downloaded = trio.Event()

        async def slow_read(*args: object) -> bytes:
            data = await real_read(*args)  # type: ignore[arg-type]
            if not downloaded.is_set():  # the first read waits, holding the old bytes
                downloading.set()
                await downloaded.wait()
            return data

        ops.blocks.read = slow_read  # type: ignore[method-assign,assignment]
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await ops.read(fh, 0, 4))

            nursery.start_soon(reader)
            await downloading.wait()
            await ops.write(direct, 0, b"new!")
            downloaded.set()
        assert got == [b"new!"]
        assert dropped == []  # nothing was answered before the write: nothing to drop
        assert await ops.read(fh, 0, 4) == b"new!"
        await ops.write(direct, 0, b"NEW!")
        assert dropped == [ino]  # the read above may be cached now

    trio.run(main)


@pytest.mark.ops
def test_direct_writes_drop_pages_only_after_reads(tmp_path: Path) -> None:
    """A direct write drops the file's cached pages only if a read was answered since the
    last drop (only reads fill pages with what the daemon holds), and buffered writes
    never do."""
    ops, fh = make_ops(tmp_path)
    ino = ops._handles[fh]
    dropped: list[int] = []
    ops.direct._invalidate = dropped.append

    async def main() -> None:
        direct = int((await ops.open(ino, os.O_WRONLY | os.O_DIRECT, None)).fh)  # type: ignore[arg-type]
        for i in range(3):
            await ops.write(direct, i * BS, b"x" * BS)
        assert dropped == []
        await ops.read(fh, 0, 10)
        await ops.write(fh, 0, b"buffered")
        assert dropped == []
        await ops.write(direct, 0, b"direct")
        await ops.write(direct, 0, b"direct")
        assert dropped == [ino]
        await ops.release(direct)
        await ops.read(fh, 0, 10)
        await ops.write(fh, 0, b"buffered")
        assert dropped == [ino]

    trio.run(main)
