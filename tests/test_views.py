"""Read-only views of checkpoints (`wsfs mount -o ro [--at WHEN]`): what changed between
two checkpoints, fetching a newer one from an older copy, and an open file keeping its
checkpoint while the view moves, without the kernel; then through real mounts."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import trio_wait_for

from wsfs.blocks import BlockCache
from wsfs.cachedir import CacheDir
from wsfs.fs.views import View, ViewOperations
from wsfs.meta import Metadata, retention
from wsfs.meta import checkpoint as ckpt
from wsfs.meta.compare import changes
from wsfs.meta.schema import ROOT
from wsfs.store import LocalStore
from wsfs.sync.flusher import Flusher

BS = 1 << 20


class Writer:
    """A workspace written through the metadata and published by the flusher, without a
    mount: each `publish` is a checkpoint."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.store = CountingStore(tmp_path / "store")
        cache = tmp_path / "writer"
        cache.mkdir()
        self.meta = Metadata(CacheDir(cache).meta_db)
        limiter = trio.CapacityLimiter(4)
        self.blocks = BlockCache(cache, self.store, block_size=BS, cache_size=1 << 26,
                                 dirty_limit=1 << 26, limiter=limiter)
        self.meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, time.time_ns(), nlink=2, ino=ROOT)
        self.flusher = Flusher(self.meta, self.blocks, self.store, cache, flush_delay=0,
                               limiter=limiter)

    def add(self, name: bytes, content: bytes, parent: int = ROOT) -> int:
        node = self.meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns(),
                                      size=len(content))
        self.meta.add_entry(parent, name, node.id)
        self.write(node.id, content)
        return node.id

    def write(self, ino: int, content: bytes) -> None:
        """Replace the contents of `ino` (new blocks, as a copy on write makes them)."""
        self.meta.remove_blocks_from(ino, 0)
        for idx in range(0, len(content), BS):
            self.meta.set_block(ino, idx // BS, self.blocks.create(content[idx : idx + BS]))
        node = self.meta.get_inode(ino)
        assert node is not None
        node.size = len(content)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self.meta.save_inode(node)

    def publish(self) -> int:
        trio.run(self.flusher.cycle)
        seq = ckpt.read_head(self.store)
        assert seq is not None
        return seq

    def fetch(self, seq: int, have: tuple[Path, ckpt.Manifest] | None = None
              ) -> tuple[Path, ckpt.Manifest]:
        path = self.root / f"view-{seq}.db"
        manifest = trio.run(lambda: ckpt.fetch(self.store, seq, path, trio.CapacityLimiter(4),
                                               have=have))
        return path, manifest

    def close(self) -> None:
        self.meta.close()
        self.blocks.close()


class CountingStore(LocalStore):
    """A LocalStore that counts its GETs of metadata pages."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.page_gets = 0

    def get(self, key: str) -> bytes:
        if key.startswith(ckpt.PAGE_PREFIX):
            self.page_gets += 1
        return super().get(key)


@pytest.mark.layers
def test_changes_between_checkpoints_are_what_the_kernel_must_forget(tmp_path: Path) -> None:
    w = Writer(tmp_path)
    a, b, c = (w.add(n, n * 100) for n in (b"a", b"b", b"c"))
    kept = w.add(b"kept", b"same")
    d = w.meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, time.time_ns(), nlink=2)
    w.meta.add_entry(ROOT, b"d", d.id)
    x = w.add(b"x", b"in d", parent=d.id)
    old, _ = w.fetch(w.publish())
    w.write(a, b"new content")  # content: new blocks
    node = w.meta.get_inode(b)
    assert node is not None
    node.mode = stat.S_IFREG | 0o600  # attributes
    w.meta.save_inode(node)
    w.meta.set_xattr(c, b"user.k", b"v")  # xattrs
    w.meta.move_entry(d.id, b"x", d.id, b"y")  # names
    new, _ = w.fetch(w.publish())
    found = changes(old, new)
    assert {a, b, c} <= found.inodes and kept not in found.inodes and x not in found.inodes
    assert found.entries == {(d.id, b"x"), (d.id, b"y")}
    w.close()


@pytest.mark.layers
def test_a_newer_checkpoint_is_fetched_from_an_older_copy(tmp_path: Path) -> None:
    """A follower fetches what a checkpoint changed, not the whole database; the result is
    the checkpoint byte for byte, even from a copy SQLite has opened (and changed) since."""
    w = Writer(tmp_path)
    for i in range(3000):  # a database of many pages
        w.add(f"file-{i:05d}-".encode() + b"n" * 200, b"")
    first, manifest = w.fetch(w.publish())
    Metadata(first).close()  # opened as a view is: WAL mode rewrites its header page
    w.add(b"one-more", b"x")
    seq = w.publish()
    w.store.page_gets = 0
    whole, _ = w.fetch(seq)
    pages = w.store.page_gets
    w.store.page_gets = 0
    (tmp_path / "again").mkdir()
    path = tmp_path / "again" / "view.db"
    trio.run(lambda: ckpt.fetch(w.store, seq, path, trio.CapacityLimiter(4),
                                have=(first, manifest)))
    assert pages >= 20 and 1 <= w.store.page_gets <= 8, (pages, w.store.page_gets)
    assert path.read_bytes() == whole.read_bytes()
    w.close()


@pytest.mark.layers
def test_an_age_may_be_written_in_words() -> None:
    now = 1_800_000_000.0
    for text, seconds in (("2d ago", 2 * 86400), ("3 days ago", 3 * 86400), ("90m", 5400),
                          ("90 minutes", 5400), ("1.5 hours ago", 5400), ("1 week", 604800),
                          ("45 secs ago", 45)):
        assert retention.parse_time(text, now) == now - seconds, text
    assert retention.parse_time("3 parsecs ago", now) is None


class Ctx:
    uid = os.getuid()
    gid = os.getgid()
    pid = os.getpid()
    umask = 0o022


class RecordingKernel:
    def __init__(self) -> None:
        self.inodes: list[int] = []
        self.entries: list[tuple[int, bytes]] = []

    def forget_inode(self, ino: int) -> None:
        self.inodes.append(ino)

    def forget_entry(self, parent: int, name: bytes) -> None:
        self.entries.append((parent, name))


@pytest.mark.ops
def test_an_open_file_keeps_its_checkpoint_until_its_last_close(tmp_path: Path) -> None:
    w = Writer(tmp_path)
    f = w.add(b"f", b"A" * 3000)
    g = w.add(b"g", b"old g")
    first, m1 = w.fetch(w.publish())
    w.write(f, b"B" * 5000)
    w.write(g, b"new g")
    w.meta.remove_entry(ROOT, b"g")
    w.meta.add_entry(ROOT, b"g2", g)
    second, m2 = w.fetch(w.publish())
    (tmp_path / "view").mkdir()
    blocks = BlockCache(tmp_path / "view", w.store.__class__(w.store.root), block_size=BS,
                        cache_size=1 << 26, dirty_limit=1 << 26,
                        limiter=trio.CapacityLimiter(4))
    retired: list[int] = []
    kernel = RecordingKernel()
    v1 = View(m1.seq, m1.created_ns, Metadata(first))
    v2 = View(m2.seq, m2.created_ns, Metadata(second))
    ops = ViewOperations(v1, blocks, kernel=kernel, retire=lambda v: retired.append(v.seq))
    ctx: pyfuse3.RequestContext = Ctx()  # type: ignore[assignment]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.keep_kernel_current)
            fi = await ops.open(pyfuse3.InodeT(f), os.O_RDONLY, ctx)
            assert await ops.read(fi.fh, 0, 100) == b"A" * 100
            await ops.lookup(pyfuse3.InodeT(ROOT), pyfuse3.FileNameT(b"g"), ctx)  # known
            ops.switch(v2, changes(first, second))
            await trio_wait_for("the kernel told", lambda: ops.forgotten >= 3)
            # f is open: neither forgotten nor moved; g's entries are
            assert f not in kernel.inodes and g in kernel.inodes
            assert set(kernel.entries) == {(ROOT, b"g"), (ROOT, b"g2")}
            assert await ops.read(fi.fh, 100, 10_000) == b"A" * 2900
            assert (await ops.getattr(pyfuse3.InodeT(f))).st_size == 3000
            looked = await ops.lookup(pyfuse3.InodeT(ROOT), pyfuse3.FileNameT(b"f"), ctx)
            assert looked.st_size == 3000
            fi2 = await ops.open(pyfuse3.InodeT(f), os.O_RDONLY, ctx)  # shares the version
            assert await ops.read(fi2.fh, 0, 10_000) == b"A" * 3000
            await ops.release(fi.fh)
            assert retired == []  # fi2 still reads checkpoint 1
            await ops.release(fi2.fh)
            await trio_wait_for("f forgotten", lambda: f in kernel.inodes)
            assert retired == [m1.seq] and f in kernel.inodes
            fi3 = await ops.open(pyfuse3.InodeT(f), os.O_RDONLY, ctx)
            assert await ops.read(fi3.fh, 0, 10_000) == b"B" * 5000
            await ops.release(fi3.fh)
            for refused in (
                    ops.open(pyfuse3.InodeT(f), os.O_WRONLY, ctx),
                    ops.unlink(pyfuse3.InodeT(ROOT), pyfuse3.FileNameT(b"f"), ctx),
                    ops.mkdir(pyfuse3.InodeT(ROOT), pyfuse3.FileNameT(b"d"),
                              pyfuse3.ModeT(0o755), ctx)):
                with pytest.raises(pyfuse3.FUSEError) as e:
                    await refused
                assert e.value.errno == errno.EROFS
            nursery.cancel_scope.cancel()

    trio.run(main)
    blocks.close()
    w.close()
