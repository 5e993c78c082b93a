"""S3 faults, injected by a proxy between wsfs and a real (moto) S3 server.

Each test writes real files through a real mount while the proxy answers 500/503/SlowDown,
resets connections, stalls, or refuses every connection, and then checks every byte on a fresh
machine (a remount on an empty cache). The promises: the mount keeps accepting writes and
serving cached data; reads of data that is not cached fail with EIO after --read-timeout,
never hang; when the store is back, everything drains; an unmount during an outage gives up
after --unmount-timeout with exit 7 and the next mount uploads what was left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, wait_for
from faultproxy import FaultProxy

from wsfs.runtime import is_mountpoint, pid_alive


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)



def write_files(mnt: Path, prefix: str, sizes: list[int]) -> dict[str, bytes]:
    files = {}
    for i, size in enumerate(sizes):
        name = f"{prefix}-{i}.bin"
        data = payload(name, size)
        (mnt / name).write_bytes(data)
        files[name] = data
    return files


def check_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = (mnt / name).read_bytes()
        assert got == data, f"{name}: {len(got)} bytes read, {len(data)} written"


def wait_drained(ws: Workspace, after_checkpoint: int, timeout: float) -> float:
    """Wait until nothing is dirty and a checkpoint newer than `after_checkpoint` is out."""
    start = time.monotonic()
    wait_for(f"the backlog to drain (checkpoint after {after_checkpoint})",
             lambda: (st := ws.status())["dirty_bytes"] == 0
             and int(st["checkpoint"]) > after_checkpoint,
             timeout)
    return time.monotonic() - start


def checkpoint(ws: Workspace) -> int:
    return int(ws.status()["checkpoint"])


def uncached_setup(ws: Workspace, *mount_args: str) -> tuple[Path, dict[str, bytes]]:
    """Write files, unmount, and remount on an empty cache: those files are not cached.

    Each file goes up in a flush cycle of its own, so no two share a pack: reading one must
    not bring another into the cache.
    """
    mnt = ws.mount()
    old = {}
    for i, size in enumerate([300_000, 2_500_000, 50_000]):
        name = f"old-{i}.bin"
        old[name] = payload(name, size)
        (mnt / name).write_bytes(old[name])
        ws.wsfs("sync", str(mnt))
    ws.unmount()
    ws.fresh_cache()
    return ws.mount(*mount_args), old


def read_errno(path: Path) -> tuple[int | None, float]:
    """Read a whole file; return (errno or None, seconds taken)."""
    start = time.monotonic()
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno, time.monotonic() - start
    return None, time.monotonic() - start


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["InternalError", "ServiceUnavailable", "SlowDown", "reset"])
def test_errors_and_resets_are_retried(proxied: tuple[Workspace, FaultProxy],
                                       fault: str) -> None:
    """Half the requests fail: reads of uncached data and uploads still succeed, by retrying."""
    ws, proxy = proxied
    mnt, old = uncached_setup(ws, "--read-timeout", "60")
    before = checkpoint(ws)
    if fault == "reset":
        proxy.resets(0.5)
    else:
        proxy.errors(0.5, code=fault)
    check_files(mnt, old)  # downloads through the faults
    # Several flush cycles, each its own pack, pages, manifest and HEAD: packs made one cycle
    # a handful of requests, too few to be sure that some of them fail.
    new: dict[str, bytes] = {}
    for round_ in range(4):
        new |= write_files(mnt, f"new{round_}", [200_000, 200_000] + [3_000_000] * (round_ == 0))
        ws.wsfs("sync", str(mnt), timeout=120)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "moved.bin").write_bytes(new["new0-0.bin"])
    wait_drained(ws, before, timeout=120)
    injected = proxy.stats["error" if fault != "reset" else "reset"]
    assert injected >= 5, proxy.stats
    proxy.pass_through()
    mnt = ws.remount(wipe_cache=True)
    check_files(mnt, old | new)
    assert (mnt / "dir" / "moved.bin").read_bytes() == new["new0-0.bin"]
    ws.unmount()


@pytest.mark.timeout(180)
def test_stall_bounds_uncached_reads_and_keeps_writes(
    proxied: tuple[Workspace, FaultProxy],
) -> None:
    """A store that accepts requests and never answers: EIO after --read-timeout, not a hang."""
    ws, proxy = proxied
    ws.allowed_log_errors.append("could not be downloaded")
    mnt, old = uncached_setup(ws, "--read-timeout", "3")
    cached = write_files(mnt, "cached", [400_000])
    before = checkpoint(ws)
    proxy.stall(30)
    err, took = read_errno(mnt / "old-1.bin")
    assert err == errno.EIO, err
    assert 2.5 <= took <= 6, f"an uncached read took {took:.1f}s to fail (read timeout 3s)"
    start = time.monotonic()
    check_files(mnt, cached)
    new = write_files(mnt, "during", [100_000] * 5)
    assert {p.name for p in mnt.iterdir()} >= set(old | new | cached)
    assert time.monotonic() - start < 5, "cached reads and writes were held up by the stall"
    assert proxy.stats["stall"] >= 1, proxy.stats
    proxy.pass_through()
    wait_for("an uncached read to reach the store again",  # a block that just timed out
             lambda: read_errno(mnt / "old-1.bin")[0] is None, timeout=10)  # fails for 1 s
    check_files(mnt, old)  # readable again once the store answers
    wait_drained(ws, before, timeout=120)
    mnt = ws.remount(wipe_cache=True)
    check_files(mnt, old | cached | new)
    ws.unmount()


@pytest.mark.timeout(400)
def test_outage_of_60s(proxied: tuple[Workspace, FaultProxy]) -> None:
    """Every connection refused for 60 s: writes go on, cached reads too, uncached ones fail
    with EIO within the read timeout, and everything drains when the store is back."""
    ws, proxy = proxied
    ws.allowed_log_errors.append("could not be downloaded")
    mnt, old = uncached_setup(ws, "--read-timeout", "5")
    check_files(mnt, {"old-0.bin": old["old-0.bin"]})  # now cached
    before = checkpoint(ws)
    proxy.outage(60)
    t0 = time.monotonic()
    written: dict[str, bytes] = {}
    eio_times = []
    round_ = 0
    while proxy.outage_active() and time.monotonic() - t0 < 50:
        written |= write_files(mnt, f"outage{round_}", [150_000, 1_200_000])
        check_files(mnt, {"old-0.bin": old["old-0.bin"]})
        err, took = read_errno(mnt / "old-1.bin")
        assert err == errno.EIO, err
        eio_times.append(took)
        round_ += 1
        time.sleep(2)  # a steady trickle, not a disk-filling flood
    assert max(eio_times) <= 8, f"uncached reads took up to {max(eio_times):.1f}s to fail"
    st = ws.status()
    assert st["dirty_bytes"] > 0 and st["state"] == "serving", st
    assert checkpoint(ws) == before, "a checkpoint was published during the outage"
    wait_for("the outage to end", lambda: not proxy.outage_active())
    drained_in = wait_drained(ws, before, timeout=120)
    print(f"outage 60s: {round_} rounds, {sum(map(len, written.values()))} bytes written, "
          f"uncached reads failed after {min(eio_times):.1f}-{max(eio_times):.1f}s, "
          f"drained {drained_in:.1f}s after the store came back")
    check_files(mnt, old)
    mnt = ws.remount(wipe_cache=True)
    check_files(mnt, old | written)
    ws.unmount()


@pytest.mark.timeout(240)
def test_unmount_during_outage_keeps_dirty_data(proxied: tuple[Workspace, FaultProxy]) -> None:
    """`wsfs unmount` gives up after --unmount-timeout with exit 7; the next mount uploads."""
    ws, proxy = proxied
    ws.allowed_log_errors.append("could not upload")
    mnt = ws.mount("--unmount-timeout", "5")
    files = write_files(mnt, "early", [100_000, 1_500_000])
    wait_drained(ws, 0, timeout=60)
    proxy.outage(3600)
    files |= write_files(mnt, "late", [200_000, 2_100_000, 10])
    pid = ws.daemon_pid()
    assert pid is not None
    start = time.monotonic()
    result = ws.wsfs("unmount", str(mnt), check=False, timeout=120)
    took = time.monotonic() - start
    assert result.returncode == 7, (result.returncode, result.stderr)
    assert str(ws.cache_dir) in result.stderr and "next mount" in result.stderr, result.stderr
    assert result.stderr.count("\n") <= 2 and "Traceback" not in result.stderr
    assert 4 <= took <= 30, f"unmount took {took:.1f}s with --unmount-timeout 5"
    assert not is_mountpoint(mnt)
    assert not pid_alive(pid)
    st = json.loads(ws.cache.status.read_text())
    assert st["state"] == "failed" and st["dirty_bytes"] > 0, st
    assert any(ws.cache.dirty.iterdir()), "the dirty blocks left the cache dir"
    print(f"unmount during outage: exit 7 after {took:.1f}s, {st['dirty_bytes']} bytes kept")
    proxy.pass_through()
    ws.mount(cache_dir=ws.cache_dir)  # the same cache dir: it uploads what was left
    wait_drained(ws, int(st["checkpoint"]), timeout=60)
    mnt = ws.remount(wipe_cache=True)
    check_files(mnt, files)
    ws.unmount()


def test_an_interrupted_mount_leaves_no_mount_behind(
        proxied: tuple[Workspace, FaultProxy]) -> None:
    """Ctrl-C on `wsfs mount` while its daemon starts (here: on a stalled store) exits 130,
    "interrupted"; the daemon runs on in its own session and mounts once the store answers.
    Finding nobody waiting for its answer, it must unmount at once, not die on the broken
    pipe and leave a dead mount ("Transport endpoint is not connected") behind."""
    ws, proxy = proxied
    proxy.stall(3.0)
    cmd = subprocess.Popen([*WSFS, "mount", ws.store_url, str(ws.mnt), "--cache-dir",
                            str(ws.cache_dir)], env={**os.environ, **ws.env},
                           stderr=subprocess.PIPE, text=True)
    wait_for("the starting daemon's first request to stall", lambda: proxy.stats["stall"] > 0,
             timeout=30)
    cmd.send_signal(signal.SIGINT)
    _, err = cmd.communicate(timeout=30)
    assert cmd.returncode == 130, err
    status = ws.cache.status
    wait_for("the daemon to mount, then end", lambda: status.exists()
             and not pid_alive(int(str(ws.status()["pid"]))), timeout=90)
    assert not is_mountpoint(ws.mnt)
    assert "interrupted while starting" in ws.cache.log.read_text()
    assert os.listdir(ws.mnt) == []  # a plain directory again, not a dead mount
    (ws.mount() / "after").write_text("the workspace mounts again")
    ws.unmount()


def test_the_lease_is_renewed_while_the_final_flush_runs(
        proxied: tuple[Workspace, FaultProxy]) -> None:
    """A container stop with a large backlog: the final flush can outlast the lease's TTL,
    and another host would then take the workspace over from under the uploading mount. The
    lease must be renewed until it is released (here: data uploads stall for three TTLs)."""
    ws, proxy = proxied
    ws.env["WSFS_LEASE_TTL"] = "2"
    mnt = ws.mount(flush_delay=3600)
    for i in range(4):
        (mnt / f"f{i}").write_bytes(random.randbytes(1 << 20))
    proxy.stall(6.0, methods=["PUT"], path="/data/")
    unmount = subprocess.Popen([*WSFS, "unmount", str(mnt)], env={**os.environ, **ws.env},
                               stderr=subprocess.PIPE, text=True)
    renewed_while_flushing = set()

    def unmounted() -> bool:  # and until then, note each renewal seen while flushing
        with contextlib.suppress(OSError, ValueError):  # (read while being rewritten)
            st = ws.status()
            if st["state"] == "flushing":
                renewed_while_flushing.add(st["lease"]["renewed"])
        return unmount.poll() is not None

    wait_for("the unmount to end", unmounted, timeout=120)
    assert unmount.returncode == 0, unmount.stderr.read() if unmount.stderr else ""
    assert len(renewed_while_flushing) >= 3, renewed_while_flushing


def test_an_unmount_whose_lease_release_fails_still_succeeds(
        proxied: tuple[Workspace, FaultProxy]) -> None:
    """Everything is in the store by the time the lease is released: a store that refuses
    that last request must not turn the unmount into a failure (the lease expires)."""
    ws, proxy = proxied
    mnt = ws.mount()
    (mnt / "kept").write_text("uploaded")
    proxy.errors(1.0, "InternalError", methods=["DELETE"], path="/lease")
    r = ws.wsfs("unmount", str(mnt), check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    assert proxy.stats["error"] > 0  # the release was refused
    proxy.pass_through()
    assert (ws.mount(cache_dir=ws.fresh_cache(), flush_delay=1.0) / "kept").read_text() == \
        "uploaded"
    ws.unmount()
