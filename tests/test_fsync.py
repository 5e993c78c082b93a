"""What fsync(2) promises, proved by SIGKILL of the daemon right after fsync returns.

Default (`fsync=local`): the data and the metadata are durable in the cache dir, so a remount
on the same cache dir finds them. `-o fsync=remote`: the data is in the object store and a
checkpoint covers it, so a mount on an EMPTY cache dir (a fresh machine) finds them. Both run
with a flush delay of an hour, so no background upload can help.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import stat
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from conftest import Workspace, s3_workspace, trio_wait_for, wait_for
from posix_util import meta_rows
from s3servers import S3Server

from wsfs.blocks import BlockCache
from wsfs.cachedir import CacheDir
from wsfs.fs import Operations
from wsfs.meta import Metadata
from wsfs.store import LocalStore
from wsfs.sync.flusher import COMMIT_INTERVAL

NEVER = 3600.0  # flush delay: nothing is uploaded unless fsync (or unmount) asks for it


def payload(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def write_and_fsync(path: Path, data: bytes) -> None:
    """Write, fsync, and leave the file open: the kill comes before close(2)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    _open_fds.append(fd)


_open_fds: list[int] = []


def kill_now(ws: Workspace) -> None:
    """SIGKILL the daemon at once, then drop the fds its death left dangling."""
    ws.kill()
    while _open_fds:
        with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
            os.close(_open_fds.pop())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scenario(mnt: Path) -> dict[str, bytes]:
    """Writes whose every effect is fsynced; returns the expected files."""
    (mnt / "d").mkdir()
    write_and_fsync(mnt / "d" / "small", payload(1, 5000))
    write_and_fsync(mnt / "big", payload(2, 3 * (1 << 20) + 12345))  # > 3 blocks
    write_and_fsync(mnt / "empty", b"")
    write_and_fsync(mnt / "to-move", payload(3, 70000))
    os.rename(mnt / "to-move", mnt / "d" / "moved")
    fsync_dir(mnt / "d")
    write_and_fsync(mnt / "doomed", b"x")
    os.unlink(mnt / "doomed")
    fsync_dir(mnt)
    fd = os.open(mnt / "big", os.O_WRONLY)  # overwrite across a block boundary
    os.pwrite(fd, payload(4, 100000), (1 << 20) - 50000)
    os.fsync(fd)
    _open_fds.append(fd)
    big = bytearray(payload(2, 3 * (1 << 20) + 12345))
    big[(1 << 20) - 50000 : (1 << 20) + 50000] = payload(4, 100000)
    return {"d/small": payload(1, 5000), "big": bytes(big), "empty": b"",
            "d/moved": payload(3, 70000)}


def check(mnt: Path, expected: dict[str, bytes]) -> None:
    for name, data in expected.items():
        assert (mnt / name).read_bytes() == data, name
    assert not (mnt / "to-move").exists()
    assert not (mnt / "doomed").exists()


def test_local_fsync_survives_a_daemon_kill(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=NEVER)
    expected = scenario(mnt)
    assert any(ws.cache.dirty.iterdir()), "nothing dirty: the test proves nothing"
    kill_now(ws)
    mnt = ws.mount(flush_delay=NEVER)  # the same cache dir
    check(mnt, expected)
    mnt = ws.remount(wipe_cache=True)  # the recovered blocks were uploaded at unmount
    check(mnt, expected)
    ws.unmount()


def test_a_closed_file_survives_a_daemon_kill_after_the_commit_interval(
        ws: Workspace) -> None:
    """close(2) without fsync: the kernel hands the file's cached pages to the daemon before
    close returns (it sends no FLUSH request: wsfs answers ENOSYS to the first), so once the
    metadata's next commit ran, a daemon crash loses nothing of it."""
    mnt = ws.mount(flush_delay=NEVER)
    files = {f"f{i}": payload(10 + i, (1 << 20) * i + 777) for i in range(4)}
    for name, data in files.items():
        fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def committed() -> bool:  # what a reader of the database (a restart) finds
        rows = meta_rows(ws, "SELECT d.name, i.size FROM dentries d JOIN inodes i"
                             " ON i.id = d.inode WHERE d.parent = 1")
        sizes = {name: size for name, size in rows}
        return all(sizes.get(name.encode()) == len(data) for name, data in files.items())

    wait_for("the metadata commit after the closes", committed,  # one COMMIT_INTERVAL or two
             timeout=COMMIT_INTERVAL * 20)
    kill_now(ws)
    mnt = ws.mount(flush_delay=NEVER)  # the same cache dir
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name
    ws.unmount()


@pytest.mark.ops
def test_flush_is_not_implemented(tmp_path: Path) -> None:
    """ENOSYS, so the kernel stops sending FLUSH at every close (see the test above)."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.flush(pyfuse3.FileHandleT(fh))
        assert exc.value.errno == errno.ENOSYS

    trio.run(main)


def test_local_fsync_does_not_reach_the_store(ws: Workspace) -> None:
    """The contrast: without fsync=remote, a fresh machine sees the last checkpoint only."""
    mnt = ws.mount(flush_delay=NEVER)
    write_and_fsync(mnt / "local-only", b"not uploaded yet")
    old_cache = ws.cache_dir
    kill_now(ws)
    mnt = ws.mount(cache_dir=ws.fresh_cache(), flush_delay=NEVER)
    assert not (mnt / "local-only").exists()
    (mnt / "elsewhere").write_text("a change published from another cache dir")
    ws.unmount()
    # The old cache dir is now older than the store: a mount on it moves it aside, never
    # deletes it, so the fsynced bytes can still be recovered by hand.
    ws.mount(cache_dir=old_cache, flush_delay=NEVER)
    stale = list(old_cache.parent.glob(f"{old_cache.name}.stale-*"))
    assert len(stale) == 1 and list(CacheDir(stale[0]).dirty.iterdir())
    ws.unmount()


def test_unpublished_work_is_recovered_when_nothing_was_published_since(ws: Workspace) -> None:
    """If no other mount published in between, the crashed cache dir is still current: its
    fsynced work comes back and is uploaded, even after a mount elsewhere that changed nothing."""
    mnt = ws.mount(flush_delay=NEVER)
    write_and_fsync(mnt / "local-only", b"not uploaded yet")
    old_cache = ws.cache_dir
    kill_now(ws)
    mnt = ws.mount(cache_dir=ws.fresh_cache(), flush_delay=NEVER)
    assert not (mnt / "local-only").exists()
    ws.unmount()
    mnt = ws.mount(cache_dir=old_cache, flush_delay=NEVER)
    assert (mnt / "local-only").read_bytes() == b"not uploaded yet"
    mnt = ws.remount(wipe_cache=True)
    assert (mnt / "local-only").read_bytes() == b"not uploaded yet"
    ws.unmount()


def test_a_checkpoint_published_just_before_a_crash_is_recognised_as_ours(
        ws: Workspace) -> None:
    """A crash after the flusher published a checkpoint and before it recorded so leaves the
    cache dir one number behind the store, with that number pending: the store's checkpoint
    of that number is its own (the manifest's creation time is the one it recorded), so the
    cache dir is still current and is used, not moved aside."""
    mnt = ws.mount(flush_delay=NEVER)
    (mnt / "published").write_bytes(b"in the last checkpoint")
    ws.unmount()
    conn = sqlite3.connect(ws.cache.meta_db)
    with conn:
        (seq,) = conn.execute("SELECT value FROM settings WHERE key='checkpoint_seq'").fetchone()
        conn.execute("UPDATE settings SET value=? WHERE key='checkpoint_seq'", (int(seq) - 1,))
    conn.close()
    store = Path(ws.store_url.removeprefix("file://"))
    manifest = store / "meta" / "manifests" / f"{int(seq):012d}.json"
    published = manifest.read_bytes()
    mnt = ws.mount(flush_delay=NEVER)  # the same cache dir
    assert (mnt / "published").read_bytes() == b"in the last checkpoint"
    assert not list(ws.cache_dir.parent.glob(f"{ws.cache_dir.name}.stale-*"))
    (mnt / "later").write_bytes(b"published next")
    ws.unmount()
    # The next checkpoint has the next number: that one was not published again over itself.
    assert json.loads((store / "meta" / "HEAD").read_text())["seq"] == int(seq) + 1
    assert manifest.read_bytes() == published


def workspace_of(kind: str, ws: Workspace, request: pytest.FixtureRequest,
                 tmp_path: Path) -> Workspace:
    """The file:// workspace `ws`, or a fresh one on the session's moto server."""
    if kind == "file":
        return ws
    server: S3Server = request.getfixturevalue("moto_server")
    w = s3_workspace(server, tmp_path / "s3")
    w.init()
    return w


@pytest.mark.parametrize("kind", ["file", "moto"])
def test_remote_fsync_is_in_the_store(kind: str, ws: Workspace, request: pytest.FixtureRequest,
                                      tmp_path: Path) -> None:
    w = workspace_of(kind, ws, request, tmp_path)
    try:
        mnt = w.mount("-o", "fsync=remote", flush_delay=NEVER)
        expected = scenario(mnt)
        kill_now(w)
        mnt = w.mount("-o", "fsync=remote", cache_dir=w.fresh_cache(), flush_delay=NEVER)
        check(mnt, expected)
        w.unmount()
    finally:
        if w is not ws:
            w.teardown()


def fsync_latencies(mnt: Path, n: int, size: int) -> list[float]:
    out = []
    data = payload(9, size)
    for i in range(n):
        fd = os.open(mnt / f"lat-{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            t = time.perf_counter()
            os.fsync(fd)
            out.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("kind", ["file", "moto"])
def test_fsync_latency(kind: str, ws: Workspace, request: pytest.FixtureRequest,
                       tmp_path: Path) -> None:
    """Measure (and report) fsync latency of a 64 KiB write in both modes."""
    w = workspace_of(kind, ws, request, tmp_path)
    report = {}
    try:
        for mode in ("local", "remote"):
            mnt = w.mount("-o", f"fsync={mode}", flush_delay=NEVER)
            lat = fsync_latencies(mnt, 20, 64 << 10)
            report[mode] = {"median_ms": round(statistics.median(lat) * 1000, 2),
                            "max_ms": round(max(lat) * 1000, 2)}
            w.unmount()
    finally:
        if w is not ws:
            w.teardown()
    print(f"\nfsync latency on {kind}: {json.dumps(report)}")
    out = os.environ.get("WSFS_FSYNC_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"store": kind, **report}) + "\n")
    # local fsync does no network round trip: it must be the cheaper one
    assert report["local"]["median_ms"] < report["remote"]["median_ms"]


# -- the mechanism: which fdatasync(2)s an fsync makes (no kernel: the handlers called directly)
#
# A daemon kill cannot tell a synced file from one in the page cache; a machine crash can,
# and cannot be staged here. These tests record every fdatasync(2) the handlers make instead:
# an fsync must not return before every block written since the last one, and the WAL, were
# synced after that write.

BS = 1 << 20
WAL = "meta.db-wal"


class SyncRecorder:
    """Stands in for os.fdatasync: records the synced file names, can hold or fail them."""

    def __init__(self) -> None:
        self.synced: list[str] = []
        self.hold: threading.Event | None = None
        self.held: list[str] = []  # the names of the syncs waiting for `hold` now
        self.fail: OSError | None = None
        self.fail_once: set[str] = set()  # names whose next sync fails (errno below)
        self.fail_once_errno = errno.EIO
        self._real = os.fdatasync

    def __call__(self, fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if self.hold is not None and not self.hold.is_set():
            self.held.append(name)
            self.hold.wait(10)
            self.held.remove(name)
        if self.fail is not None:
            raise self.fail
        if name in self.fail_once:
            self.fail_once.discard(name)
            raise OSError(self.fail_once_errno, "injected")
        self._real(fd)
        self.synced.append(name)

    def take(self) -> list[str]:
        out, self.synced = self.synced, []
        return out


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> SyncRecorder:
    rec = SyncRecorder()
    monkeypatch.setattr(os, "fdatasync", rec)
    return rec


def make_ops(tmp_path: Path) -> tuple[Operations, int]:
    """The assembled handlers over a fresh cache dir, and an open handle of an empty file."""
    cache = tmp_path / "cache"
    cache.mkdir()
    blocks = BlockCache(cache, LocalStore(tmp_path / "store"), block_size=BS,
                        cache_size=1 << 26, dirty_limit=1 << 26,
                        limiter=trio.CapacityLimiter(4))
    meta = Metadata(CacheDir(cache).meta_db, hooks=blocks)
    meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, time.time_ns(), nlink=2, ino=1)
    node = meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
    meta.add_entry(1, b"f", node.id)
    ops = Operations(meta, blocks)
    return ops, int(ops._open_handle(node.id, os.O_RDWR).fh)


def blocks_of(ops: Operations, ino: int = 2) -> dict[int, str]:
    return {i: r.id for i, r in ops.meta.blocks_in(ino, 0, 1 << 20).items()}


def second_file(ops: Operations) -> tuple[int, pyfuse3.FileHandleT]:
    """Another empty file beside make_ops's, and an open handle of it."""
    node = ops.meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
    ops.meta.add_entry(1, b"g", node.id)
    return node.id, pyfuse3.FileHandleT(int(ops._open_handle(node.id, os.O_RDWR).fh))


@pytest.mark.ops
def test_fsync_syncs_each_written_block_and_the_wal(tmp_path: Path,
                                                     recorder: SyncRecorder) -> None:
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        fh_ = pyfuse3.FileHandleT(fh)
        for idx in range(4):
            await ops.write(fh_, idx * BS, b"x" * 4096)
        await ops.fsync(fh_, False)
        ids = blocks_of(ops)
        assert sorted(recorder.take()) == sorted([*ids.values(), "meta.db-wal"])
        await ops.fsync(fh_, False)  # nothing written since: nothing to sync
        assert recorder.take() == []
        await ops.write(fh_, 2 * BS + 10, b"y")  # one block: only it, and no size change
        await ops.fsync(fh_, True)
        assert recorder.take() == [ids[2]]
        node = ops._node(2)
        node.mtime_ns += 1  # what the kernel's setattr does before an fsync
        ops.meta.save_inode(node)
        await ops.fsync(fh_, True)  # fdatasync: a timestamp alone needs no sync
        assert recorder.take() == []
        await ops.fsync(fh_, False)  # fsync: it does
        assert recorder.take() == ["meta.db-wal"]
        await ops.write(fh_, 4 * BS, b"z")  # grows the file: fdatasync must sync the WAL
        await ops.fsync(fh_, True)
        assert sorted(recorder.take()) == sorted([blocks_of(ops)[4], "meta.db-wal"])

    trio.run(main)


@pytest.mark.ops
def test_fsync_leaves_uploaded_blocks_to_the_store_and_syncs_their_checksums(
        tmp_path: Path, recorder: SyncRecorder) -> None:
    """A block the store holds needs no disk flush: the checksum that says so does."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        fh_ = pyfuse3.FileHandleT(fh)
        for idx in range(3):
            await ops.write(fh_, idx * BS, b"x" * 4096)
        ids = blocks_of(ops)
        # The flusher freezes and uploads block 0 before any fsync (its checksum is not
        # committed yet); block 1 is written again and sealed with it, then the fsync.
        await ops.write(fh_, BS + 8192, b"y" * 4096)
        ops.blocks.seal_all()
        ops.meta.set_uploaded({ids[0]: hashlib.sha256(b"whatever").hexdigest()})
        await ops.fsync(fh_, True)
        assert sorted(recorder.take()) == sorted([ids[1], ids[2], "meta.db-wal"])
        durable = Metadata(CacheDir(tmp_path / "cache").meta_db)  # what a crash would find
        try:
            assert not durable.awaits_upload(ids[0]) and durable.awaits_upload(ids[1])
        finally:
            durable.close()

    trio.run(main)


@pytest.mark.ops
def test_a_write_during_a_running_fsync_is_synced_by_the_next(
        tmp_path: Path, recorder: SyncRecorder) -> None:
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        fh_ = pyfuse3.FileHandleT(fh)
        await ops.write(fh_, 0, b"a" * 4096)
        block = blocks_of(ops)[0]
        recorder.hold = threading.Event()
        order: list[str] = []

        async def first() -> None:
            await ops.fsync(fh_, False)
            order.append("first")

        async def second() -> None:
            await ops.fsync(fh_, False)  # the block's fsync(2) is running: it must wait
            order.append("second")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio_wait_for("first's fdatasync(2) held", lambda: block in recorder.held)
            await ops.write(fh_, 100, b"b")  # lands in the page cache during the sync
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and recorder.synced == []
            recorder.hold.set()
        assert order == ["first", "second"]
        assert recorder.take().count(block) == 2  # the second synced the later write again

    trio.run(main)


@pytest.mark.ops
def test_a_failed_block_sync_fails_the_fsync_and_is_retried(
        tmp_path: Path, recorder: SyncRecorder) -> None:
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        fh_ = pyfuse3.FileHandleT(fh)
        await ops.write(fh_, 0, b"a" * 4096)
        recorder.fail = OSError(errno.ENOSPC, "injected")
        with pytest.raises(pyfuse3.FUSEError) as exc:  # its errno (a group would be EIO)
            await ops.fsync(fh_, False)
        assert exc.value.errno == errno.ENOSPC
        recorder.fail = None
        await ops.fsync(fh_, False)
        assert sorted(recorder.take()) == sorted([blocks_of(ops)[0], "meta.db-wal"])

    trio.run(main)


def test_fdatasync_survives_a_daemon_kill(ws: Workspace) -> None:
    """fdatasync(2) (which SQLite uses) of a grown file and of an overwrite in place."""
    mnt = ws.mount(flush_delay=NEVER)
    fd = os.open(mnt / "db", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, payload(5, 3 * 4096))
    os.fdatasync(fd)
    os.pwrite(fd, payload(6, 4096), 4096)
    os.fdatasync(fd)
    _open_fds.append(fd)
    expected = bytearray(payload(5, 3 * 4096))
    expected[4096:8192] = payload(6, 4096)
    kill_now(ws)
    mnt = ws.mount(flush_delay=NEVER)
    assert (mnt / "db").read_bytes() == bytes(expected)
    ws.unmount()


@pytest.mark.ops
@pytest.mark.parametrize("state", ["sealed", "uploaded"])
def test_a_small_write_to_a_frozen_block_copies_it_and_fsync_syncs_the_copy(
        state: str, tmp_path: Path, recorder: SyncRecorder) -> None:
    """Copy on write, made by the kernel from the sealed block's file or the clean cache."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        fh_ = pyfuse3.FileHandleT(fh)
        old = payload(7, BS - 1000)  # a short tail block: its length is copied too
        await ops.write(fh_, 0, old)
        first = blocks_of(ops)[0]
        ops.blocks.seal_all()
        if state == "uploaded":
            await ops.blocks.upload(first)
            ops.blocks.retire(first, uploaded_at=0)
            ops.blocks.clean._recent.clear()  # from the clean cache's file, not from memory
            assert not ops.blocks.is_writable(first) and first not in ops.blocks.dirty.lengths
        await ops.fsync(fh_, False)
        recorder.take()
        hits = ops.blocks.hits
        await ops.write(fh_, 5000, b"new")
        assert ops.blocks.hits == hits  # copied file to file, never read into the trio thread
        copy = blocks_of(ops)[0]
        assert copy != first and ops.blocks.is_writable(copy)
        # synced as a copy, before any commit could name it (the old bytes were durable)
        assert recorder.take() == [copy]
        expected = bytearray(old)
        expected[5000:5003] = b"new"
        assert await ops.read(fh_, 0, BS) == bytes(expected)
        assert ops.blocks.dirty_length(copy) == len(old)
        await ops.fsync(fh_, False)
        assert sorted(recorder.take()) == sorted([copy, "meta.db-wal"])
        await ops.write(fh_, 6000, b"again")  # the copy is writable: no second copy
        assert blocks_of(ops)[0] == copy

    trio.run(main)


@pytest.mark.ops
def test_a_cut_tail_block_is_synced_before_the_metadata_names_it(
        tmp_path: Path, recorder: SyncRecorder) -> None:
    """Truncating into the middle of a block copies its head into a new block; that copy of
    fsynced bytes is made durable before any commit can name it (docs/faults.md)."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        fh_ = pyfuse3.FileHandleT(fh)
        await ops.write(fh_, 0, payload(3, BS + 5000))
        await ops.fsync(fh_, False)
        recorder.take()
        node = ops.meta.get_inode(2)
        assert node is not None
        await ops._truncate(node, 3000)
        tail = blocks_of(ops)
        assert list(tail) == [0]
        assert recorder.take() == [tail[0]]
        assert await ops.read(fh_, 0, BS) == payload(3, BS + 5000)[:3000]

    trio.run(main)


@pytest.mark.ops
def test_concurrent_fsyncs_share_one_wal_sync(tmp_path: Path, recorder: SyncRecorder) -> None:
    """Group commit: an fsync whose changes a running WAL sync already covers waits for that
    sync instead of starting its own, and returns only after it ended; one with a change
    committed after that sync began syncs the WAL itself."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        f, g = pyfuse3.FileHandleT(fh), second_file(ops)[1]
        await ops.write(f, 0, b"f" * 4096)
        await ops.write(g, 0, b"g" * 4096)
        done: list[str] = []

        async def fsync(name: str, handle: pyfuse3.FileHandleT) -> None:
            await ops.fsync(handle, False)
            done.append(name)

        recorder.hold = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync, "f", f)
            await trio_wait_for("f's WAL sync held", lambda: WAL in recorder.held)
            nursery.start_soon(fsync, "g", g)  # g's new block is in the WAL being synced
            await trio.testing.wait_all_tasks_blocked()
            assert done == [] and recorder.synced == []
            recorder.hold.set()
        assert sorted(done) == ["f", "g"]
        synced = recorder.take()
        assert synced.count("meta.db-wal") == 1
        assert sorted(synced) == sorted([blocks_of(ops)[0], blocks_of(ops, 3)[0], "meta.db-wal"])

        recorder.hold = threading.Event()
        async with trio.open_nursery() as nursery:
            await ops.write(f, 2 * BS, b"f")  # a new block: f's WAL sync covers it
            nursery.start_soon(fsync, "f2", f)
            await trio_wait_for("f2's WAL sync held", lambda: WAL in recorder.held)
            await ops.write(g, 3 * BS, b"g")  # after that sync began: not covered by it
            nursery.start_soon(fsync, "g2", g)
            await trio.testing.wait_all_tasks_blocked()
            recorder.hold.set()
        synced = recorder.take()
        assert synced.count("meta.db-wal") == 2  # g2 could not share f2's
        assert blocks_of(ops, 3)[3] in synced and blocks_of(ops)[2] in synced

    trio.run(main)


@pytest.mark.ops
def test_a_failed_shared_wal_sync_is_redone_by_the_caller_that_waited(
        tmp_path: Path, recorder: SyncRecorder) -> None:
    """Group commit never turns the leader's failure into a waiter's success: the waiter finds
    the WAL unsynced after the leader's sync failed, and syncs it itself. (A full disk: after
    an EIO no sync succeeds again, test_a_failed_metadata_sync_is_never_followed_by_a_success.)"""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        f, g = pyfuse3.FileHandleT(fh), second_file(ops)[1]
        await ops.write(f, 0, b"f" * 4096)
        await ops.write(g, 0, b"g" * 4096)
        results: dict[str, int] = {}

        async def fsync(name: str, handle: pyfuse3.FileHandleT) -> None:
            try:
                await ops.fsync(handle, False)
                results[name] = 0
            except pyfuse3.FUSEError as e:
                results[name] = e.errno

        recorder.hold = threading.Event()
        recorder.fail_once = {"meta.db-wal"}
        recorder.fail_once_errno = errno.ENOSPC
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync, "f", f)
            await trio_wait_for("f's WAL sync held", lambda: WAL in recorder.held)
            nursery.start_soon(fsync, "g", g)  # waits for f's WAL sync, which fails
            await trio.testing.wait_all_tasks_blocked()
            recorder.hold.set()
        assert results == {"f": errno.ENOSPC, "g": 0}
        synced = recorder.take()
        assert synced.count("meta.db-wal") == 1  # g's own, after f's failed
        assert blocks_of(ops, 3)[0] in synced

    trio.run(main)


async def maintain_a_while(blocks: BlockCache) -> None:
    """Let the block cache's upkeep (deleting released files) run for a moment: for a file
    that must NOT go, no event says "it would have gone by now", so the time is the test."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocks.maintain)
        await trio.sleep(0.3)  # several of its passes, which follow each other every 0.05 s
        nursery.cancel_scope.cancel()


async def maintain_until(blocks: BlockCache, what: str, cond: Callable[[], bool]) -> None:
    """Run the block cache's upkeep until `cond` holds."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocks.maintain)
        await trio_wait_for(what, cond)
        nursery.cancel_scope.cancel()


@pytest.mark.ops
def test_a_let_go_block_file_stays_until_its_commit_is_synced(tmp_path: Path) -> None:
    """A machine crash loses the commits no fdatasync of the WAL covered. The file of a block
    such a commit let go of (dropped from its file, or uploaded with its checksum recorded)
    must stay until that commit is durable: else the metadata that comes back after the
    crash names a block with neither a file nor a checksum (a hole in fsynced data)."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        blocks, meta = ops.blocks, ops.meta
        await ops.write(pyfuse3.FileHandleT(fh), 0, payload(3, BS + 10))
        uploaded, dropped = blocks_of(ops)[0], blocks_of(ops)[1]
        files = [CacheDir(tmp_path / "cache").dirty / b for b in (uploaded, dropped)]
        meta.flush()
        await ops.fsync(pyfuse3.FileHandleT(fh), False)
        for ref in meta.remove_blocks_from(2, 1):  # a truncate to one block
            blocks.discard(ref.id)
        blocks.seal_all()
        meta.set_uploaded({uploaded: await blocks.upload(uploaded)})
        meta.flush()  # commits both changes (and releases the dropped block to the sync)
        blocks.retire(uploaded, uploaded_at=meta.commits)
        await maintain_a_while(blocks)
        assert all(f.exists() for f in files), "deleted before the commit was durable"
        assert blocks.awaiting_sync()
        meta.sync()
        await maintain_until(blocks, "the files to go once the commit is durable",
                             lambda: not any(f.exists() for f in files))
        assert not blocks.awaiting_sync()

    trio.run(main)


@pytest.mark.ops
def test_a_read_of_a_block_dropped_while_it_waited_reads_the_hole(tmp_path: Path) -> None:
    """A read takes its blocks' list, then waits for each block in turn; a truncate that ran
    meanwhile may have dropped a later one, never uploaded, whose file is gone. That part
    reads as the hole the file now has there, not as EIO with a corruption logged."""
    async def main() -> None:
        ops, fh = make_ops(tmp_path)
        await ops.write(pyfuse3.FileHandleT(fh), 0, payload(4, 5000))
        ref = ops.meta.blocks_in(2, 0, 0)[0]
        ops.meta.flush()
        for gone in ops.meta.remove_blocks_from(2, 0):  # the truncate
            ops.blocks.discard(gone.id)
        ops.meta.flush()
        ops.meta.sync()
        await maintain_until(ops.blocks, "the dropped block's file to go",
                             lambda: not (CacheDir(tmp_path / "cache").dirty / ref.id).exists())
        assert await ops._read_block(2, ref, 0, 100) == b""

    trio.run(main)


@pytest.mark.layers
def test_a_failed_metadata_sync_is_never_followed_by_a_success(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports a failed writeback once: a later fdatasync through a new fd would
    succeed over pages it never wrote. So once a sync of the metadata failed, every later
    one fails too (fsync(2) says EIO), and no commit counts as durable: no block file goes."""
    meta = Metadata(tmp_path / "meta.db")
    meta.set_setting("a", "1")
    meta.flush()

    def fails(fd: int) -> None:
        raise OSError(errno.EIO, "writeback failed")

    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", fails)
        with pytest.raises(OSError):
            meta.sync()
    meta.set_setting("b", "2")
    meta.flush()
    with pytest.raises(OSError):
        meta.sync()
    assert meta.synced_commits == 0
    with pytest.raises(OSError):
        meta.close()


@pytest.mark.ops
def test_a_listing_cached_before_a_group_rollback_is_not_served_after_it(
        tmp_path: Path) -> None:
    """On a full disk SQLite rolls a whole group of changes back; the change counter the
    listing cache is keyed on does not go back with it, so a listing filled with a
    rolled-back name was served on (the name listed, its lookup ENOENT)."""
    ops, _ = make_ops(tmp_path)
    ops.meta.flush()
    ops.meta.conn.execute("BEGIN")
    node = ops.meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
    ops.meta.add_entry(1, b"lost", node.id)
    assert b"lost" in [name for name, _, _ in ops._listing(1, 0)]
    ops.meta.conn.rollback()  # what SQLite does on SQLITE_FULL
    ops.meta.get_inode(1)  # the next call finds the group gone
    assert [name for name, _, _ in ops._listing(1, 0)] == [b"f"]
