"""Crash: SIGKILL the daemon while a writer works, and check every acknowledged byte.

A writer process (this file run as a script) creates, overwrites, patches, appends to,
truncates, renames and deletes files of varied sizes (some span several 1 MiB blocks) on the
mount, fsyncs some of them, and records in a manifest OUTSIDE the mount (fsynced itself):

    {"op": "mod",  "path": P}                  before anything that changes P starts
    {"op": "ack",  "path": P, "sha": H, "size": N}   after fsync of P returned
    {"op": "gone", "path": P}                  after P's removal was fsynced (dir fsync)

A path whose newest record is "ack" was not modified after its fsync: it must be there with
exactly that content. "gone" must be absent. "mod" may be anything (written, not fsynced).
No file may exist that the writer never made.

Each cycle: writer runs → SIGKILL at a random moment → what a machine crash would also have
lost is lost (the bytes of every data journal record are zeroed in the dirty blocks' files,
conftest.lose_unsynced_writes) → remount on the SAME cache dir (must
serve at once; every acknowledged byte there; the unpublished dirty blocks uploaded with no
manual step: dirty_bytes reaches 0 and a checkpoint is published) → unmount → mount on an
EMPTY cache dir: the tree must be identical to what the same-cache remount showed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20


# -- the writer (runs in a subprocess; stdlib only) --------------------------------------------

def writer(root: Path, manifest: Path, seed: int) -> None:
    rnd = random.Random(seed)
    mf = open(manifest, "a")  # noqa: SIM115 - lives as long as this process

    def record(**event: object) -> None:
        mf.write(json.dumps(event) + "\n")
        mf.flush()
        os.fsync(mf.fileno())

    def fsync_path(p: Path, directory: bool = False) -> None:
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def ack(rel: str) -> None:
        data = model[rel]
        record(op="ack", path=rel, sha=hashlib.sha256(data).hexdigest(), size=len(data))

    def size() -> int:
        r = rnd.random()
        if r < 0.1:
            return 0
        if r < 0.7:
            return rnd.randrange(1, 100_000)
        if r < 0.8:
            return MiB  # exactly one block
        return rnd.randrange(MiB + 1, 2 * MiB + MiB // 2)

    def pwrite_all(fd: int, data: bytes, off: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n

    dirs = ["", "a", "a/b", "c"]
    for d in dirs[1:]:
        (root / d).mkdir(parents=True, exist_ok=True)
    model: dict[str, bytes] = {}
    n = 0
    while True:
        n += 1
        names = sorted(model)
        op = rnd.choices(["new", "overwrite", "patch", "append", "truncate", "rename", "unlink"],
                         [4, 2, 3, 2, 1, 2, 1])[0]
        if not names or ((op == "new" or len(names) < 3) and len(names) < 14):
            op = "new"
        sync = rnd.random() < 0.6
        if op == "new":
            rel = "/".join(filter(None, [rnd.choice(dirs), f"f{n}"]))
            data = rnd.randbytes(size())
            record(op="mod", path=rel)
            fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                pwrite_all(fd, data, 0)
                model[rel] = data
                if sync:
                    os.fsync(fd)
                    ack(rel)
            finally:
                os.close(fd)
        elif op in ("overwrite", "patch", "append", "truncate"):
            rel = rnd.choice(names)
            old = model[rel]
            record(op="mod", path=rel)
            fd = os.open(root / rel, os.O_WRONLY | (os.O_APPEND if op == "append" else 0))
            try:
                if op == "overwrite":
                    new = rnd.randbytes(size())
                    os.ftruncate(fd, 0)
                    pwrite_all(fd, new, 0)
                elif op == "patch":  # in place, often across a block boundary
                    off = rnd.randrange(0, len(old) + 1)
                    if len(old) > MiB and rnd.random() < 0.5:
                        off = MiB - rnd.randrange(1, 5000)
                    piece = rnd.randbytes(rnd.randrange(1, 200_000))
                    pwrite_all(fd, piece, off)
                    new = old[:off].ljust(off, b"\0") + piece + old[off + len(piece):]
                elif op == "append":
                    piece = rnd.randbytes(rnd.randrange(1, MiB + MiB // 2))
                    pwrite_all(fd, piece, len(old))  # O_APPEND: the offset is ignored
                    new = old + piece
                else:
                    length = rnd.randrange(0, len(old) + 300_000)
                    os.ftruncate(fd, length)
                    new = old[:length].ljust(length, b"\0")
                model[rel] = new
                if sync:
                    os.fsync(fd)
                    ack(rel)
            finally:
                os.close(fd)
        elif op == "rename":
            src = rnd.choice(names)
            if rnd.random() < 0.3 and len(names) > 1:
                dst = rnd.choice([x for x in names if x != src])  # over an existing file
            else:
                dst = "/".join(filter(None, [rnd.choice(dirs), f"r{n}"]))
            record(op="mod", path=src)
            record(op="mod", path=dst)
            os.rename(root / src, root / dst)
            model[dst] = model.pop(src)
            if sync:
                fsync_path(root / dst)  # wsfs: fsync of a file makes all metadata durable
                record(op="gone", path=src)
                ack(dst)
        else:
            rel = rnd.choice(names)
            record(op="mod", path=rel)
            os.unlink(root / rel)
            del model[rel]
            if sync:
                fsync_path((root / rel).parent, directory=True)
                record(op="gone", path=rel)


# -- checking -------------------------------------------------------------------------------------

def expectations(manifest: Path) -> dict[str, tuple[str, ...]]:
    """The newest record per path: ("ack", sha, size) | ("mod",) | ("gone",)."""
    state: dict[str, tuple[str, ...]] = {}
    with open(manifest) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn last line: the writer died mid-record, before it mattered
            ev = json.loads(line)
            if ev["op"] == "ack":
                state[ev["path"]] = ("ack", ev["sha"], str(ev["size"]))
            else:
                state[ev["path"]] = (ev["op"],)
    return state


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: 'dir' for directories, 'sha:size' for files."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel_dir, d))] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            data = Path(p).read_bytes()
            out[os.path.normpath(os.path.join(rel_dir, name))] = (
                f"{hashlib.sha256(data).hexdigest()}:{len(data)}")
    return out


def check_acknowledged(root: Path, state: dict[str, tuple[str, ...]]) -> int:
    """Assert the manifest's promises under `root`; return the bytes checked."""
    checked = 0
    for rel, st in state.items():
        p = root / rel
        if st[0] == "ack":
            assert p.is_file(), f"acknowledged file {rel} is missing"
            data = p.read_bytes()
            assert len(data) == int(st[2]), f"{rel}: size {len(data)}, acknowledged {st[2]}"
            assert hashlib.sha256(data).hexdigest() == st[1], f"{rel}: content differs"
            checked += len(data)
        elif st[0] == "gone":
            assert not p.exists(), f"{rel} was deleted (fsynced) but is back"
    known = set(state)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            assert rel in known, f"{rel} exists but the writer never made it"
    return checked


WRITER_STOPPED = 3  # the writer's exit code when the mount went away under it

if __name__ == "__main__":
    try:
        writer(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    except OSError as e:  # ENOTCONN, or ENOENT once the dead mount was lazily detached
        print(f"writer stopped: {e}", file=sys.stderr)
        sys.exit(WRITER_STOPPED)


# -- the tests ------------------------------------------------------------------------------------

import pytest  # noqa: E402
from conftest import (  # noqa: E402
    Workspace,
    lose_unsynced_writes,
    until,
    wait_for,
    wait_pid_gone,
)
from s3servers import start_moto  # noqa: E402

from wsfs.runtime import pid_alive  # noqa: E402

pytestmark = pytest.mark.crash

CYCLES = int(os.environ.get("WSFS_CRASH_CYCLES", "22"))
SEED = int(os.environ.get("WSFS_CRASH_SEED", "20240917"))


def wait_drained(ws: Workspace, since: float, timeout: float = 60) -> dict[str, object]:
    """Wait until nothing is dirty and a checkpoint was published after wall time `since`."""
    st: dict[str, Any] = {}

    def drained() -> bool:
        nonlocal st
        try:
            st = ws.status()
        except (OSError, ValueError):
            st = {}
        return (st.get("dirty_bytes") == 0 and st.get("dirty_blocks") == 0
                and float(st.get("last_checkpoint_time") or 0) > since
                and st.get("state") == "serving")

    assert until(drained, timeout), f"recovered dirty data not uploaded: {st}"
    return st


def start_writer(root: Path, manifest: Path, seed: int) -> subprocess.Popen[bytes]:
    root.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, __file__, str(root), str(manifest), str(seed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_writer(proc: subprocess.Popen[bytes]) -> str:
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError("the writer hung after the daemon died") from None
    return err.decode(errors="replace")


@pytest.mark.timeout(480)
def started(manifest: Path, proc: subprocess.Popen[bytes]) -> bool:
    """Whether the writer has written (or ended: the assertion after says how)."""
    return manifest.stat().st_size > 0 or proc.poll() is not None


def test_sigkill_at_random_points(ws: Workspace) -> None:
    rnd = random.Random(SEED)
    figures = {"cycles": 0, "acked_files": 0, "acked_bytes_checked": 0, "served_dirty": 0,
               "max_remount_s": 0.0, "files_compared": 0, "journal_records_lost": 0}
    ws.allowed_log_errors.append("flush failed")  # a kill mid-cycle may leave a half-cycle
    mnt = ws.mount(flush_delay=rnd.choice([0.3, 1.0]))
    for cycle in range(CYCLES):
        root = mnt / f"c{cycle}"
        manifest = ws.root / f"manifest-{cycle}.jsonl"
        manifest.touch()
        proc = start_writer(root, manifest, SEED + cycle)
        wait_for("the writer to start writing", functools.partial(started, manifest, proc),
                 timeout=20)
        assert proc.poll() is None, stop_writer(proc)
        time.sleep(rnd.uniform(0.05, 2.5))  # the point: a kill at a random moment of the work
        assert proc.poll() is None, f"the writer died before the kill: {stop_writer(proc)}"
        ws.kill()
        err = stop_writer(proc)
        assert proc.returncode == WRITER_STOPPED, err
        figures["journal_records_lost"] += len(lose_unsynced_writes(ws.cache_dir))

        # Remount on the same cache dir: serves at once, every acknowledged byte is there.
        t0, wall = time.monotonic(), time.time()
        mnt = ws.mount(flush_delay=rnd.choice([0.3, 1.0, 5.0]))
        (mnt / f"c{cycle}").stat()
        figures["max_remount_s"] = max(figures["max_remount_s"], time.monotonic() - t0)
        st = ws.status()
        if st["dirty_blocks"]:
            figures["served_dirty"] += 1
        state = expectations(manifest)
        figures["acked_bytes_checked"] += check_acknowledged(mnt / f"c{cycle}", state)
        figures["acked_files"] += sum(1 for s in state.values() if s[0] == "ack")
        seen = tree(mnt)
        # The recovered dirty blocks go up by themselves: no manual step.
        wait_drained(ws, wall)

        # A fresh machine sees exactly what the same-cache remount showed.
        ws.unmount()
        mnt = ws.mount(cache_dir=ws.fresh_cache(), flush_delay=rnd.choice([0.3, 1.0]))
        fresh = tree(mnt)
        assert fresh == seen, f"cycle {cycle}: the fresh-cache view differs: " + str(
            sorted(set(fresh.items()) ^ set(seen.items()))[:10])
        figures["files_compared"] += len(fresh)
        figures["cycles"] += 1
        if cycle % 4 == 3:  # old cache dirs pile up: drop the ones no longer used
            for old in ws.root.glob("cache-*"):
                if old != ws.cache_dir:
                    subprocess.run(["rm", "-rf", str(old)], check=False)
    ws.unmount()
    print(f"\ncrash figures: {json.dumps(figures)}")
    assert figures["acked_files"] > CYCLES  # the writer got to fsync things
    assert figures["served_dirty"] > 0  # some remounts served before the recovered upload
    assert figures["journal_records_lost"] > 0  # the replay had work to do


@pytest.mark.timeout(240)
def test_sigkill_during_the_final_flush(tmp_path: Path) -> None:
    """`wsfs unmount` with ~48 MB dirty on a stalled store, SIGKILL while state == flushing."""
    server = start_moto()  # private: it is stopped (SIGSTOP) to stall the flush
    assert server.process is not None
    ws: Workspace | None = None
    try:
        bucket = "crash-flush"
        server.create_bucket(bucket)
        ws = Workspace(tmp_path, f"s3://{bucket}/ws", env=server.env())
        ws.init()
        mnt = ws.mount(flush_delay=3600)
        rnd = random.Random(SEED)
        expected: dict[str, bytes] = {}
        for i in range(24):
            data = rnd.randbytes(rnd.choice([MiB * 2 + 17, 900_000, 3 * MiB]))
            (mnt / f"f{i}").write_bytes(data)
            expected[f"f{i}"] = data
        pid = ws.daemon_pid()
        assert pid is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # the store stalls
        try:
            unmount = subprocess.Popen(
                [sys.executable, "-m", "wsfs", "unmount", str(mnt)],
                env={**os.environ, **ws.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            wait_for("the final flush", lambda: ws.status().get("state") == "flushing")
            dirty = int(ws.status()["dirty_bytes"])
            assert dirty > 40 * MiB, dirty
            os.kill(pid, signal.SIGKILL)
            wait_pid_gone(pid)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        _, err = unmount.communicate(timeout=60)
        assert unmount.returncode == 7, (unmount.returncode, err)  # FlushError
        assert "stays in" in err and "Traceback" not in err, err

        # Same cache dir: everything is there, and the dirty blocks go up by themselves.
        wall = time.time()
        mnt = ws.mount(flush_delay=1)
        for name, data in expected.items():
            assert (mnt / name).read_bytes() == data, name
        wait_drained(ws, wall)
        seen = tree(mnt)
        ws.unmount()
        mnt = ws.mount(cache_dir=ws.fresh_cache())
        assert tree(mnt) == seen
        ws.unmount()
        assert not pid_alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.process.pid, signal.SIGCONT)
        if ws is not None:
            ws.teardown()
        server.stop()
