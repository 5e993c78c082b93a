"""Read-only views of checkpoints (`wsfs mount -o ro [--at WHEN]`): what changed between
two checkpoints, fetching a newer one from an older copy, and an open file keeping its
checkpoint while the view moves, without the kernel; then through real mounts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from conftest import Workspace, not_refused_as_read_only, trio_wait_for, wait_for
from faultproxy import FaultProxy
from s3servers import S3Server
from treecompare import assert_same, snapshot

from wsfs.blocks import BlockCache
from wsfs.cachedir import CacheDir
from wsfs.fs.views import View, ViewOperations
from wsfs.meta import Metadata, retention
from wsfs.meta import checkpoint as ckpt
from wsfs.meta.compare import changes
from wsfs.meta.schema import ROOT
from wsfs.runtime import force_unmount, is_mountpoint
from wsfs.store import LocalStore
from wsfs.store.readonly import ReadOnlyStore, ReadOnlyStoreError
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


@pytest.mark.layers
def test_a_read_only_store_refuses_every_write(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path / "store")
    inner.put("k", b"v")
    store = ReadOnlyStore(inner)
    assert store.get("k") == b"v" and store.head("k") == 1 and list(store.list()) == [("k", 1)]
    for write in (lambda: store.put("k", b"w"), lambda: store.put_if_absent("n", b"w"),
                  lambda: store.put_if_match("k", b"w", store.get_tagged("k")[1]),
                  lambda: store.delete("k"), lambda: store.delete_many(["k"])):
        with pytest.raises(ReadOnlyStoreError):
            write()
    assert inner.get("k") == b"v" and inner.head("n") is None


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


# -- through real mounts ------------------------------------------------------------------

def store_objects(ws: Workspace) -> dict[str, tuple[int, int, str]]:
    """Every object of the workspace's file:// store: key -> (size, mtime, content hash)."""
    root = ws.root / "store"
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = path.stat()
            found[str(path.relative_to(root))] = (
                st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@contextlib.contextmanager
def view(ws: Workspace, name: str, *args: str, cache: Path | None = None) -> Iterator[Path]:
    """A read-only mount of `ws`'s store on ROOT/`name` (`args`: --at, --refresh, ...), on
    an empty cache dir of its own; unmounted (and its log checked) at the end."""
    mnt = ws.root / name
    mnt.mkdir(exist_ok=True)
    cache = cache or ws.root / f"{name}-cache"
    ws.wsfs("mount", ws.store_url, str(mnt), "-o", "ro", "--cache-dir", str(cache), *args)
    try:
        yield mnt
        ws.wsfs("unmount", str(mnt))
        assert not is_mountpoint(mnt)
        bad = [line for line in CacheDir(cache).log.read_text().splitlines()
               if " ERROR " in line or "Traceback" in line]
        assert not bad, "the read-only mount logged errors:\n" + "\n".join(bad[:20])
    finally:
        force_unmount(mnt)


def view_status(cache: Path) -> dict[str, Any]:
    return CacheDir(cache).read_status()


def refused(path: Path) -> list[str]:
    """The writes at `path` (a directory holding the file `f`) that were not refused with
    EROFS."""
    attempts: dict[str, Callable[[], object]] = {
        "create": lambda: (path / "new").write_bytes(b"x"),
        "open for writing": lambda: os.close(os.open(path / "f", os.O_WRONLY)),
        "truncate": lambda: os.truncate(path / "f", 0),
        "unlink": lambda: (path / "f").unlink(),
        "mkdir": lambda: (path / "dir").mkdir(),
        "rename": lambda: (path / "f").rename(path / "g"),
        "chmod": lambda: (path / "f").chmod(0o600),
        "utime": lambda: os.utime(path / "f", (1, 1)),
        "setxattr": lambda: os.setxattr(path / "f", "user.x", b"1"),
        "symlink": lambda: (path / "new-link").symlink_to("f"),
    }
    return not_refused_as_read_only(attempts)


def build(mnt: Path) -> None:
    """A small tree with every kind of thing a checkpoint holds."""
    d = mnt / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "f").write_bytes(b"first\n")
    (d / "big.bin").write_bytes(os.urandom(3 * BS + 123))
    (d / "sub" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (d / "sub" / "script.sh").chmod(0o750)
    (d / "private").write_text("secret\n")
    (d / "private").chmod(0o600)
    os.utime(d / "private", ns=(1_500_000_000_123_456_789, 1_400_000_000_987_654_321))
    (d / "link").symlink_to("sub/script.sh")
    os.link(d / "f", d / "hardlink")
    os.setxattr(d / "f", "user.note", b"kept")
    with open(d / "sparse", "wb") as out:
        out.truncate(5 * BS)
        out.seek(2 * BS)
        out.write(b"middle")


@pytest.mark.timeout(300)
def test_a_past_checkpoint_mounts_read_only_on_an_empty_cache(ws: Workspace) -> None:
    """`-o ro --at WHEN` shows the checkpoint WHEN names, exactly, on an empty cache, with
    no lease, beside the writer (which keeps its lease and goes on publishing); writes get
    EROFS. WHEN as a number, a snapshot name and a time between two checkpoints."""
    mnt = ws.mount()
    build(mnt)
    ws.wsfs("sync", str(mnt))
    past = ws.status()["checkpoint"]
    expected = snapshot(mnt / "tree")
    between = datetime.now().isoformat(timespec="microseconds")
    ws.wsfs("snapshot", "create", str(mnt), "before-cleanup")
    shutil.rmtree(mnt / "tree" / "sub")
    (mnt / "tree" / "f").write_bytes(b"changed\n")
    (mnt / "tree" / "added").write_text("later\n")
    ws.wsfs("sync", str(mnt))
    assert ws.status()["checkpoint"] > past
    lease = (ws.root / "store" / "lease").read_bytes()
    for n, when in enumerate((str(past), "before-cleanup", between)):
        start = time.monotonic()
        with view(ws, f"past-{n}", "--at", when) as old:
            mounted = time.monotonic() - start
            assert view_status(ws.root / f"past-{n}-cache")["view"]["checkpoint"] == past
            assert_same(expected, snapshot(old / "tree"), what=f"--at {when}",
                        ignore=("atime_ns",))  # (the writer's reads since may set atimes)
            assert refused(old / "tree") == []
            print(f"--at {when}: mounted in {mounted:.2f}s, read in "
                  f"{time.monotonic() - start - mounted:.2f}s")
    assert (ws.root / "store" / "lease").read_bytes() == lease  # the writer's, untouched
    (mnt / "tree" / "after").write_text("the writer goes on\n")
    ws.wsfs("sync", str(mnt))
    assert not ws.status()["fenced"]
    ws.unmount()


def test_a_read_only_mount_writes_nothing_to_the_store(ws: Workspace) -> None:
    """No lease, no manifest, no HEAD, no repack, no thinning: the store's objects are the
    same, byte for byte and by mtime, after a read-only mount that read everything, with
    short repack and refresh intervals."""
    mnt = ws.mount()
    build(mnt)
    for i in range(200):  # packs, most of them then dead: a writer would repack them
        (mnt / "tree" / f"small-{i}").write_bytes(os.urandom(2000))
    ws.wsfs("sync", str(mnt))
    for i in range(190):
        (mnt / "tree" / f"small-{i}").unlink()
    ws.unmount()
    before = store_objects(ws)
    assert "lease" not in before
    saved, ws.env = ws.env, {**ws.env, "WSFS_REPACK_INTERVAL": "0.1"}
    try:
        with view(ws, "reader", "--refresh", "0.1") as ro:
            snapshot(ro)  # every byte read
            ws.wsfs("sync", str(ro))  # a look at meta/HEAD, at once
    finally:
        ws.env = saved
    assert store_objects(ws) == before


def test_bad_whens_mount_nothing(ws: Workspace) -> None:
    mnt = ws.mount()
    (mnt / "f").write_text("x")
    ws.unmount()
    target = ws.root / "ro"
    target.mkdir()
    cache = ws.root / "ro-cache"
    for when, said in (("999", "checkpoint 999 is not kept"),
                       ("2h ago", "before the first kept checkpoint"),
                       ("2999-01-01T00:00", "is in the future"),
                       ("no-such-snapshot", "there is no snapshot named"),
                       ("yesterday-ish!", "is neither a checkpoint number")):
        result = ws.wsfs("mount", ws.store_url, str(target), "--at", when,
                         "--cache-dir", str(cache), check=False)
        assert result.returncode == 2, (when, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0], (when, result.stderr)
        assert not is_mountpoint(target) and not cache.exists()
    before = store_objects(ws)
    result = ws.wsfs("mount", ws.store_url, str(target), "-o", "ro", "--init", check=False)
    assert result.returncode == 2 and "--init" in result.stderr
    assert store_objects(ws) == before


def test_a_read_only_mount_and_a_writer_never_share_a_cache_dir(ws: Workspace) -> None:
    mnt = ws.mount()
    target = ws.root / "ro"
    target.mkdir()
    result = ws.wsfs("mount", ws.store_url, str(target), "-o", "ro", "--cache-dir",
                     str(ws.cache_dir), check=False)
    assert result.returncode == 6 and "read-write mount's" in result.stderr, result.stderr
    ws.unmount()
    with view(ws, "ro"):
        pass
    result = ws.wsfs("mount", ws.store_url, str(mnt), "--cache-dir",
                     str(ws.root / "ro-cache"), check=False)
    assert result.returncode == 6 and "read-only mount's" in result.stderr, result.stderr


def test_an_open_file_keeps_its_checkpoint_through_a_real_mount(ws: Workspace) -> None:
    """A follower moves names, listings and closed files to each newer checkpoint (the
    kernel's cached entries, misses and pages dropped), while a file open on the older one
    reads that version, through any handle, until its last close."""
    mnt = ws.mount()
    (mnt / "f").write_bytes(b"A" * (BS + BS // 2))
    (mnt / "g").write_text("old g\n")
    ws.wsfs("sync", str(mnt))
    with view(ws, "follower", "--refresh", "0") as ro:  # it moves at `wsfs sync` only
        cache = ws.root / "follower-cache"
        assert not (ro / "new").exists()  # a miss the kernel caches
        assert (ro / "g").read_text() == "old g\n"  # pages the kernel caches
        first = open(ro / "f", "rb")  # noqa: SIM115 - held across the move
        assert first.read(BS) == b"A" * BS
        with open(mnt / "f", "r+b") as w:  # rewritten in place: the same inode, longer
            w.write(b"B" * 2 * BS)
        (mnt / "g").write_text("new g\n")
        (mnt / "new").write_text("new\n")
        ws.wsfs("sync", str(mnt))
        seq = ws.status()["checkpoint"]
        ws.wsfs("sync", str(ro))
        assert view_status(cache)["view"]["checkpoint"] == seq
        said = ws.wsfs("status", str(ro)).stdout
        assert f"read-only:   checkpoint #{seq}" in said and "no lease" in said, said
        assert (ro / "new").read_text() == "new\n"
        assert (ro / "g").read_text() == "new g\n"
        assert first.read() == b"A" * (BS // 2)  # the rest, as it was
        assert os.fstat(first.fileno()).st_size == os.stat(ro / "f").st_size == BS + BS // 2
        with open(ro / "f", "rb") as second:  # opened meanwhile: the same version
            assert second.read() == b"A" * (BS + BS // 2)
        first.close()  # (the kernel sends its release after close(2) returns)
        wait_for("the last close", lambda: view_status(cache)["view"]["older_open"] == 0)
        assert (ro / "f").stat().st_size == 2 * BS
        assert (ro / "f").read_bytes() == b"B" * 2 * BS
    ws.unmount()


GROUP = 6  # files per generation
TOTAL = 6000  # what each generation's files sum to


def write_generations(mnt: Path, stop: threading.Event, done: list[int]) -> None:
    """The writer's invariant, kept across files as a local filesystem keeps it: each
    generation is a new directory of GROUP files summing to TOTAL, every file fsynced, then
    made current by one atomic rename of a symlink; the oldest generations are deleted."""
    rng = random.Random(7)
    g = 0
    while not stop.is_set():
        g += 1
        d = mnt / f"gen-{g}"
        d.mkdir()
        cuts = sorted(rng.randrange(TOTAL + 1) for _ in range(GROUP - 1))
        values = [b - a for a, b in zip([0, *cuts], [*cuts, TOTAL], strict=True)]
        for i, value in enumerate(values):
            with open(d / f"part-{i}", "wb") as f:
                f.write(f"{g} {value}\n".encode() + os.urandom(rng.randrange(1, 200_000)))
                os.fsync(f.fileno())
        (mnt / "current.tmp").symlink_to(d.name)
        os.rename(mnt / "current.tmp", mnt / "current")
        done.append(g)
        if g > 8:
            shutil.rmtree(mnt / f"gen-{g - 8}")


def read_generation(ro: Path) -> int | None:
    """The generation `current` names, its files all opened before any is read, checked
    against the writer's invariant; None if it was deleted meanwhile (the view moved on)."""
    try:
        gen = int(os.readlink(ro / "current").removeprefix("gen-"))
        files = [open(ro / f"gen-{gen}" / f"part-{i}", "rb") for i in range(GROUP)]  # noqa: SIM115
    except FileNotFoundError:
        return None
    try:
        heads = [f.readline().split() for f in files]
        rests = [f.read() for f in files]
    finally:
        for f in files:
            f.close()
    assert all(int(h[0]) == gen for h in heads), f"generation {gen} shows {heads}"
    assert sum(int(h[1]) for h in heads) == TOTAL, f"generation {gen} is torn: {heads}"
    assert all(rests), f"generation {gen} has an empty file"
    return gen


@pytest.mark.timeout(300)
def test_a_follower_beside_a_busy_writer_never_shows_a_torn_state(ws: Workspace) -> None:
    """The follower reads what the writer keeps true across files (each generation sums to
    TOTAL) while the writer works flat out, for 20 s: never a torn generation, never a step
    back, and it moves to new data within its refresh period."""
    mnt = ws.mount(flush_delay=0.5)
    stop, done = threading.Event(), list[int]()
    writer = threading.Thread(target=write_generations, args=(mnt, stop, done))
    writer.start()
    refresh = 1.0
    try:
        wait_for("a first generation", lambda: len(done) >= 1)
        ws.wsfs("sync", str(mnt))
        with view(ws, "follower", "--refresh", str(refresh)) as ro:
            seen: list[int] = []
            gone = 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                gen = read_generation(ro)
                if gen is None:
                    gone += 1
                    continue
                assert not seen or gen >= seen[-1], f"back from {seen[-1]} to {gen}"
                seen.append(gen)
            stop.set()
            writer.join()
            ws.wsfs("sync", str(mnt))
            last, published = done[-1], time.monotonic()
            wait_for("the follower at the last generation",
                     lambda: read_generation(ro) == last, timeout=refresh + 10)
            lag = time.monotonic() - published
            moves = view_status(ws.root / "follower-cache")["view"]["moves"]
            print(f"{len(seen)} consistent reads of {len(set(seen))} generations "
                  f"({gone} gone while opened) out of {last} written; {moves} moves; "
                  f"the last one shown {lag:.2f}s after its sync returned")
            assert len(set(seen)) >= 5 and moves >= 5
            assert lag < refresh + 5
    finally:
        stop.set()
        writer.join()
    assert not ws.status()["fenced"]
    ws.unmount()


def test_read_only_mounts_on_every_kind_of_store(any_ws: Workspace) -> None:
    """A past state and a follower over S3 (moto, rclone serve s3) as over file://."""
    ws = any_ws
    mnt = ws.mount()
    data = os.urandom(BS + BS // 2)
    (mnt / "f").write_bytes(data)
    ws.wsfs("sync", str(mnt))
    past = ws.status()["checkpoint"]
    (mnt / "f").unlink()
    (mnt / "g").write_text("g\n")
    ws.wsfs("sync", str(mnt))
    with view(ws, "past", "--at", str(past)) as old:
        assert (old / "f").read_bytes() == data and not (old / "g").exists()
    with view(ws, "live", "--refresh", "0") as live:
        assert (live / "g").read_text() == "g\n" and not (live / "f").exists()
        (mnt / "h").write_text("h\n")
        ws.wsfs("sync", str(mnt))
        ws.wsfs("sync", str(live))
        assert (live / "h").read_text() == "h\n"
    ws.unmount()


def test_a_follower_rides_out_a_store_outage(proxied: tuple[Workspace, FaultProxy],
                                             moto_server: S3Server) -> None:
    """The follower's store fails: it goes on serving the checkpoint it shows (what it
    cached reads on), says so in its status, and catches up once the store answers."""
    ws, proxy = proxied
    through_proxy = ws.env
    ws.env = {**through_proxy, "AWS_ENDPOINT_URL": moto_server.endpoint_url}
    mnt = ws.mount()  # the writer reaches the store directly
    (mnt / "f").write_text("f\n")
    ws.wsfs("sync", str(mnt))
    ws.env = through_proxy
    cache = ws.root / "live-cache"
    with view(ws, "live", "--refresh", "0.2") as live:
        assert (live / "f").read_text() == "f\n"
        proxy.errors(1.0)
        (mnt / "g").write_text("g\n")
        ws.wsfs("sync", str(mnt))
        wait_for("the failing look", lambda: view_status(cache)["view"]["error"] is not None)
        assert (live / "f").read_text() == "f\n" and not (live / "g").exists()
        proxy.pass_through()
        wait_for("the catch-up", lambda: (live / "g").exists(), timeout=60)
        wait_for("the status", lambda: view_status(cache)["view"]["error"] is None)
    ws.unmount()
