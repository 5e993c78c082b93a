"""What fsync(2) promises, proved by SIGKILL of the daemon right after fsync returns.

Default (`fsync=local`): the data and the metadata are durable in the cache dir, so a remount
on the same cache dir finds them. `-o fsync=remote`: the data is in the object store and a
checkpoint covers it, so a mount on an EMPTY cache dir (a fresh machine) finds them. Both run
with a flush delay of an hour, so no background upload can help.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import pytest
from conftest import Workspace, s3_workspace
from s3servers import S3Server

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
    assert any((ws.cache_dir / "dirty").iterdir()), "nothing dirty: the test proves nothing"
    kill_now(ws)
    mnt = ws.mount(flush_delay=NEVER)  # the same cache dir
    check(mnt, expected)
    mnt = ws.remount(wipe_cache=True)  # the recovered blocks were uploaded at unmount
    check(mnt, expected)
    ws.unmount()


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
    assert len(stale) == 1 and list((stale[0] / "dirty").iterdir())
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
