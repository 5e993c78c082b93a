"""One writer per workspace: the lease in the store and the lock on the cache dir.

A second mount of the same store is refused (exit 5, LeaseError) with a message naming the
holder, whether it uses another cache dir, the same cache dir, or runs on "another host" (a
lease object written with a foreign host name). A dead holder on this host is taken over at
once, a foreign one once its lease expires, and a live one only with --force.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Workspace, s3_workspace, wait_for, wait_pid_gone
from s3servers import S3Server
from test_failstart import gated_head, start_mount

from wsfs.cachedir import CacheDir
from wsfs.daemon.lease import Holder, Lease, read_holder
from wsfs.errors import LeaseError, MountError
from wsfs.runtime import is_mountpoint
from wsfs.store import LocalStore, S3Store

TTL = "3"  # seconds: WSFS_LEASE_TTL for every mount here, so expiry tests take seconds


@pytest.fixture
def lws(tmp_path: Path) -> Iterator[Workspace]:
    """A file:// workspace whose mounts use a short lease TTL."""
    w = Workspace(tmp_path / "a", f"file://{tmp_path / 'store'}", env={"WSFS_LEASE_TTL": TTL})
    w.init()
    yield w
    w.teardown()


@pytest.fixture
def other(lws: Workspace) -> Iterator[Workspace]:
    """A second client of the same store: its own mountpoint, cache dir and run dir."""
    w = Workspace(lws.root.parent / "b", lws.store_url, env=dict(lws.env))
    w.env["WSFS_RUN_DIR"] = str(w.root / "run")
    yield w
    w.teardown()


def lease_of(ws: Workspace) -> dict[str, object] | None:
    path = Path(ws.store_url.removeprefix("file://")) / "lease"
    if not path.exists():
        return None
    return dict(json.loads(path.read_bytes()))


def write_foreign_lease(ws: Workspace, host: str, expires_in: float) -> None:
    store = LocalStore(Path(ws.store_url.removeprefix("file://")))
    store.put("lease", json.dumps({
        "host": host, "pid": 4242, "mount_id": "f" * 32, "cache_dir": "/var/cache/wsfs/x",
        "expires": time.time() + expires_in,
    }).encode())


def mount_refused(ws: Workspace, *extra: str) -> str:
    """Try to mount `ws`; assert it is refused as a second writer; return stderr."""
    r = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-dir", str(ws.cache_dir),
                *extra, check=False, timeout=60)
    assert r.returncode == LeaseError.exit_code, r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mountpoint(ws.mnt)
    return r.stderr


def test_second_mount_other_cache_dir_refused_names_holder(lws: Workspace,
                                                           other: Workspace) -> None:
    mnt = lws.mount()
    (mnt / "f").write_text("mine")
    pid = lws.daemon_pid()
    err = mount_refused(other)
    assert f"pid {pid}" in err and socket.gethostname() in err and str(lws.cache_dir) in err
    assert "already mounted" in err
    # The refused mount changed nothing: the first one still holds the lease and serves.
    lease = lease_of(lws)
    assert lease is not None and lease["pid"] == pid
    assert (mnt / "f").read_text() == "mine"
    lws.unmount()
    assert lease_of(lws) is None, "unmount must release the lease"
    other.mount()
    assert (other.mnt / "f").read_text() == "mine"
    other.unmount()


def test_second_mount_same_cache_dir_refused(lws: Workspace, other: Workspace) -> None:
    lws.mount()
    pid = lws.daemon_pid()
    other.cache_dir = lws.cache_dir
    err = mount_refused(other)
    assert f"pid {pid}" in err and str(lws.cache_dir) in err
    # The refused daemon must not have erased the holder's pid from the lock file.
    assert lws.cache.lock.read_text().strip() == str(pid)
    lws.unmount()


def test_dead_holder_on_this_host_taken_over_at_once(lws: Workspace, other: Workspace) -> None:
    mnt = lws.mount()
    (mnt / "f").write_bytes(b"x" * 1000)
    os.fsync(os.open(mnt / "f", os.O_RDONLY))
    lws.kill()  # SIGKILL: the lease in the store still names the dead pid, unexpired
    lease = lease_of(lws)
    assert lease is not None and float(lease["expires"]) > time.time()  # type: ignore[arg-type]
    start = time.monotonic()
    lws.mount()  # same cache dir, same host: the dead pid is detected, no wait for expiry
    assert time.monotonic() - start < float(TTL)
    assert (lws.mnt / "f").read_bytes() == b"x" * 1000
    assert "taking over the lease" in lws.cache.log.read_text()
    lws.unmount()


def test_foreign_host_refused_until_expiry(lws: Workspace) -> None:
    write_foreign_lease(lws, "notebook-7.elsewhere", expires_in=4)
    err = mount_refused(lws)
    assert "notebook-7.elsewhere" in err and "pid 4242" in err
    # 4.5 s later, the same lease has expired: the clock moves on in the store, not in a sleep
    write_foreign_lease(lws, "notebook-7.elsewhere", expires_in=-0.5)
    lws.mount()
    lease = lease_of(lws)
    assert lease is not None and lease["host"] == socket.gethostname()
    assert lease["pid"] == lws.daemon_pid()
    lws.unmount()


def test_force_takes_over_a_live_foreign_lease(lws: Workspace) -> None:
    write_foreign_lease(lws, "notebook-7.elsewhere", expires_in=3600)
    mount_refused(lws)
    lws.mount("--force")
    lease = lease_of(lws)
    assert lease is not None and lease["pid"] == lws.daemon_pid()
    assert "taking over the lease of host notebook-7.elsewhere" in (
        lws.cache.log).read_text()
    lws.unmount()


def test_force_against_a_live_mount_the_old_one_yields(lws: Workspace,
                                                       other: Workspace) -> None:
    """The --force risk, observed: the old holder notices, stops renewing, logs an error."""
    lws.mount()
    other.mount("--force")
    new_pid = other.daemon_pid()
    lws.allowed_log_errors.append("another mount took over this workspace's lease")
    log = lws.cache.log
    wait_for("the old holder to notice the takeover",
             lambda: "another mount took over" in log.read_text(), timeout=10)
    time.sleep(float(TTL))  # several renewal periods: the old mount must not steal it back
    lease = lease_of(lws)
    assert lease is not None and lease["pid"] == new_pid
    lws.unmount()  # releasing must not delete the new holder's lease
    lease = lease_of(lws)
    assert lease is not None and lease["pid"] == new_pid
    other.unmount()
    assert lease_of(lws) is None


@pytest.mark.parametrize("kind", ["moto", "rclone"])
def test_s3_second_mount_refused(kind: str, request: pytest.FixtureRequest,
                                 tmp_path: Path) -> None:
    """On S3 too; moto honours If-None-Match, rclone serve s3 ignores it (HEAD+PUT fallback)."""
    server: S3Server = request.getfixturevalue(f"{kind}_server")
    a = s3_workspace(server, tmp_path / "a")
    b = Workspace(tmp_path / "b", a.store_url, env=server.env())
    try:
        a.init()
        a.mount()
        pid = a.daemon_pid()
        err = mount_refused(b)
        assert f"pid {pid}" in err
        a.kill(signal.SIGKILL)
        assert pid is not None
        wait_pid_gone(pid)
        b.mount()  # dead holder on this host: taken over at once, from another cache dir
        b.unmount()
    finally:
        a.teardown()
        b.teardown()
    # What the store does with conditional writes (S3Store detects it on first use).
    old = dict(os.environ)
    os.environ.update(server.env())
    try:
        bucket = a.store_url.removeprefix("s3://").split("/")[0]
        store = S3Store(bucket, "probe", endpoint_url=server.endpoint_url, path_style=True)
        assert store.put_if_absent("k", b"1") is True
        second = store.put_if_absent("k", b"2")
        assert second is False  # the HEAD fallback still refuses a sequential second create
        assert store.conditional_writes is (kind == "moto")
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_a_taken_over_mount_stops_publishing(lws: Workspace, other: Workspace) -> None:
    """After --force elsewhere, the old mount must not overwrite the new holder's checkpoints:
    its later changes stay in its cache dir and its unmount says so (exit 7). (A long TTL:
    the old mount accepts the write before its next renewal tells it it is fenced.)"""
    lws.env["WSFS_LEASE_TTL"] = "60"
    lws.mount()
    other.mount("--force")
    (other.mnt / "from-new-holder").write_text("kept")
    other.wsfs("sync", str(other.mnt))
    (lws.mnt / "from-old-holder").write_text("must not reach the store")
    lws.allowed_log_errors.append("another mount took over")
    r = lws.wsfs("unmount", str(lws.mnt), check=False, timeout=120)
    assert r.returncode == 7, r.stderr
    assert "took over" in r.stderr
    other.unmount()
    other.fresh_cache()
    mnt = other.mount()
    assert (mnt / "from-new-holder").read_text() == "kept"
    assert not (mnt / "from-old-holder").exists()
    other.unmount()


def head_of(ws: Workspace) -> int:
    store = Path(ws.store_url.removeprefix("file://"))
    return int(json.loads((store / "meta" / "HEAD").read_text())["seq"])


def setting_of(cache_dir: Path, key: str) -> str | None:
    conn = sqlite3.connect(CacheDir(cache_dir).meta_db)
    try:
        row = conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def test_a_taken_over_cache_dir_is_behind_one_checkpoint_of_the_same_number(
        lws: Workspace, other: Workspace) -> None:
    """The old holder records the number of the checkpoint it is about to publish before it
    finds itself fenced off. When the new holder then publishes exactly that number, a mount
    on the old cache dir must still find it behind the store (moved aside), not take it for
    current and publish that number again over the new holder's work."""
    lws.env["WSFS_LEASE_TTL"] = "60"  # it accepts the write before a renewal fences it
    mnt = lws.mount()
    (mnt / "base").write_text("published by the first holder")
    lws.wsfs("sync", str(mnt))
    head = head_of(lws)
    other.mount("--force", flush_delay=3600)  # publishes only at its unmount
    (mnt / "from-old-holder").write_text("must not reach the store")
    lws.allowed_log_errors.append("another mount took over")
    r = lws.wsfs("unmount", str(mnt), check=False, timeout=120)
    assert r.returncode == 7, r.stderr
    old_cache = lws.cache_dir
    assert setting_of(old_cache, "pending_seq") == str(head + 1)  # it was about to publish
    (other.mnt / "from-new-holder").write_text("kept")
    other.unmount()
    assert head_of(lws) == head + 1  # the number the old holder had recorded
    mnt = lws.mount(cache_dir=old_cache)
    assert (mnt / "from-new-holder").read_text() == "kept"
    assert not (mnt / "from-old-holder").exists()
    stale = list(old_cache.parent.glob(f"{old_cache.name}.stale-*"))
    assert len(stale) == 1  # kept for recovery by hand, never deleted
    lws.unmount()
    mnt = lws.mount(cache_dir=lws.fresh_cache())
    assert (mnt / "from-new-holder").read_text() == "kept"
    assert (mnt / "base").read_text() == "published by the first holder"
    lws.unmount()


def test_a_lease_gone_from_the_store_fences_the_mount(lws: Workspace) -> None:
    """Only a later holder's release (or `wsfs destroy`) deletes the lease: a mount that
    finds it gone was taken over meanwhile. It must stop publishing, not write the lease back
    and publish over the mounts since (their checkpoints, whose garbage they deleted)."""
    lws.env["WSFS_LEASE_TTL"] = "60"  # it accepts the write before a renewal fences it
    mnt = lws.mount()
    (Path(lws.store_url.removeprefix("file://")) / "lease").unlink()
    (mnt / "late").write_text("must not reach the store")
    lws.allowed_log_errors.append("another mount took over")
    r = lws.wsfs("unmount", str(mnt), check=False, timeout=120)
    assert r.returncode == 7, r.stderr
    assert lease_of(lws) is None
    mnt = lws.mount(cache_dir=lws.fresh_cache())
    assert not (mnt / "late").exists()
    lws.unmount()


@pytest.mark.layers
def test_a_lease_whose_conditional_write_lost_its_answer_is_ours(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conditional PUT landed but its answer was lost, and the client's retry was
    refused (412): the lease found is this mount's own, not "already mounted" by itself."""
    monkeypatch.setattr(Holder, "alive_here", lambda self: True)  # as a daemon's own pid is

    class AnswerLost(LocalStore):
        def put_if_absent(self, key: str, data: bytes) -> bool:
            super().put_if_absent(key, data)
            return False

    store = AnswerLost(tmp_path / "store")
    lease = Lease(store, str(tmp_path / "cache"))
    lease.acquire()
    holder = read_holder(store)
    assert holder is not None and holder.mount_id == lease.mount_id


def test_a_start_that_fails_keeps_the_lease_guarding_unpublished_work(lws: Workspace) -> None:
    """A mount killed while its uploads were unpublished leaves its lease (gc refuses while
    it is there). The next mount from that cache dir takes it over; if that mount then
    fails to start, it must leave the lease too, or `wsfs gc` deletes the uploads that only
    this cache dir's metadata names."""
    mnt = lws.mount(flush_delay=3600)
    with open(mnt / "unpublished", "w") as f:
        f.write("only in this cache dir")
        f.flush()
        os.fsync(f.fileno())
    lws.kill()
    dead = (lease_of(lws) or {}).get("mount_id")
    # The mountpoint vanishes once the lease is taken over: the mount fails after it.
    with gated_head(lws):
        proc = start_mount(lws, lws.cache_dir)
        try:
            wait_for("the lease taken over", lambda: (lease_of(lws) or {}).get("mount_id")
                     not in (dead, None), timeout=60)
            lws.mnt.rmdir()
        except BaseException:
            proc.kill()
            raise
    _, err = proc.communicate(timeout=60)
    lws.mnt.mkdir()
    assert proc.returncode == MountError.exit_code and not is_mountpoint(lws.mnt), err
    assert lease_of(lws) is not None
    lws.allowed_log_errors.append("the lease stays in the store")
    assert (lws.mount() / "unpublished").read_text() == "only in this cache dir"
    lws.unmount()
    assert lease_of(lws) is None
