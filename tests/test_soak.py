"""Soak: concurrent writers, readers, renames and deletes while flushes run, then a full check.

Marked slow (not in the default run): `WSFS_SOAK_SECONDS=600 bash tests/run.sh -m slow`.
Threads work on a fixed set of file slots, each with its own lock, so operations on different
files overlap freely (and with the flusher, at flush_delay 1 s) while the model of what each
file holds stays exact. Directory renames take every slot lock: they move files whose blocks
may be uploading at that moment. Readers compare against the model as they go; at the end
the mount is compared, unmounted, remounted on an EMPTY cache dir and compared again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Workspace, wait_for

from wsfs.config import env_seconds

pytestmark = pytest.mark.crash

MiB = 1 << 20
SECONDS = env_seconds("WSFS_SOAK_SECONDS", 600.0)
SLOTS = 48
DIRS = 4


class Model:
    """What every file slot holds: its path (None: deleted) and its content."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.paths: list[str | None] = [None] * SLOTS
        self.data: list[bytes] = [b""] * SLOTS
        self.locks = [threading.Lock() for _ in range(SLOTS)]
        self.dirs = [f"d{i}" for i in range(DIRS)]
        self.names = 0
        self.names_lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.bytes_written = 0
        self.stop = threading.Event()
        self.errors: list[str] = []

    def unique(self, prefix: str) -> str:
        with self.names_lock:
            self.names += 1
            return f"{prefix}{self.names}"

    @contextlib.contextmanager
    def all_slots(self) -> Iterator[None]:
        for lock in self.locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(self.locks):
                lock.release()

    def expected_tree(self) -> dict[str, bytes]:
        return {p: d for p, d in zip(self.paths, self.data, strict=True) if p is not None}


def content(rnd: random.Random) -> bytes:
    r = rnd.random()
    if r < 0.05:
        return b""
    if r < 0.95:
        return rnd.randbytes(rnd.randrange(1, 64 << 10))
    return rnd.randbytes(rnd.randrange(MiB, MiB * 5 // 2))


def pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def writer(m: Model, seed: int) -> None:
    rnd = random.Random(seed)
    while not m.stop.is_set():
        i = rnd.randrange(SLOTS)
        with m.locks[i]:
            path, old = m.paths[i], m.data[i]
            truncate: int | None = None
            if path is None:
                kind = "create"
                path = f"{rnd.choice(m.dirs)}/{m.unique('f')}"
                off, data = 0, content(rnd)
                new = data
            else:
                kind = rnd.choice(["overwrite", "patch", "append", "truncate"])
                if kind == "overwrite":
                    truncate, off, data = 0, 0, content(rnd)
                    new = data
                elif kind == "patch":  # in place, sometimes past the end (a hole)
                    off = rnd.randrange(0, len(old) + 1000)
                    data = rnd.randbytes(rnd.randrange(1, 200_000))
                    new = old[:off].ljust(off, b"\0") + data + old[off + len(data):]
                elif kind == "append":
                    off, data = len(old), rnd.randbytes(rnd.randrange(1, 300_000))
                    new = old + data
                else:
                    truncate, off, data = rnd.randrange(0, len(old) + 100_000), 0, b""
                    new = old[:truncate].ljust(truncate, b"\0")
            flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if kind == "create" else 0)
            fd = os.open(m.mnt / path, flags, 0o644)
            try:
                if truncate is not None:
                    os.ftruncate(fd, truncate)
                pwrite_all(fd, data, off)
                if rnd.random() < 0.1:
                    os.fsync(fd)
                    m.counts["fsync"] += 1
            finally:
                os.close(fd)
            m.paths[i], m.data[i] = path, new
            m.counts[kind] += 1
            m.bytes_written += len(data)


def reader(m: Model, seed: int) -> None:
    rnd = random.Random(seed)
    while not m.stop.is_set():
        i = rnd.randrange(SLOTS)
        with m.locks[i]:
            path = m.paths[i]
            if path is None:
                continue
            got = (m.mnt / path).read_bytes()
            if got != m.data[i]:
                m.errors.append(f"read {path}: {len(got)} bytes, expected {len(m.data[i])}")
            m.counts["read"] += 1


def renamer(m: Model, seed: int) -> None:
    """File renames (sometimes over another file), deletes, and now and then a dir rename."""
    rnd = random.Random(seed)
    while not m.stop.is_set():
        r = rnd.random()
        if r < 0.05:
            with m.all_slots():
                k = rnd.randrange(len(m.dirs))
                old, new = m.dirs[k], m.unique("d")
                os.rename(m.mnt / old, m.mnt / new)
                m.dirs[k] = new
                for i, p in enumerate(m.paths):
                    if p is not None and p.startswith(old + "/"):
                        m.paths[i] = new + p[len(old):]
                m.counts["dir-rename"] += 1
            time.sleep(0.05)  # the point: a steady load; directory renames are the rarest
            continue
        i, j = rnd.randrange(SLOTS), rnd.randrange(SLOTS)
        if r < 0.35:  # delete
            with m.locks[i]:
                p = m.paths[i]
                if p is not None:
                    os.unlink(m.mnt / p)
                    m.paths[i], m.data[i] = None, b""
                    m.counts["delete"] += 1
        elif r < 0.5 and i != j:  # rename over another slot's file
            a, b = sorted((i, j))
            with m.locks[a], m.locks[b]:
                src, dst = m.paths[i], m.paths[j]
                if src is not None and dst is not None:
                    os.rename(m.mnt / src, m.mnt / dst)
                    m.data[j], m.paths[i], m.data[i] = m.data[i], None, b""
                    m.counts["rename-over"] += 1
        else:
            with m.locks[i]:
                src = m.paths[i]
                if src is not None:
                    new = f"{rnd.choice(m.dirs)}/{m.unique('r')}"
                    os.rename(m.mnt / src, m.mnt / new)
                    m.paths[i] = new
                    m.counts["rename"] += 1
        time.sleep(0.002)  # the point: a steady load beside the writers, not a busy loop


def run_guarded(m: Model, fn: Callable[[Model, int], None], seed: int) -> None:
    try:
        fn(m, seed)
    except BaseException as e:
        m.errors.append(f"{fn.__name__}: {type(e).__name__}: {e}")
        m.stop.set()


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def compare(root: Path, m: Model, when: str) -> int:
    """Assert the tree under `root` is exactly the model; return the bytes compared."""
    got = tree(root)
    got.pop(".workspace.initialized", None)
    want = m.expected_tree()
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{when}: missing {missing[:5]}, extra {extra[:5]}"
    wrong = [p for p in want if got[p] != want[p]]
    assert not wrong, f"{when}: wrong content in {wrong[:5]}"
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == sorted(m.dirs)
    return sum(len(d) for d in got.values())


@pytest.mark.slow
@pytest.mark.timeout(int(SECONDS) + 900)
def test_soak(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=1)
    m = Model(mnt)
    for d in m.dirs:
        (mnt / d).mkdir()
    roles: list[Callable[[Model, int], None]] = [writer, writer, writer, reader, reader,
                                                 renamer]
    threads = [threading.Thread(target=run_guarded, args=(m, fn, 1000 + k), daemon=True)
               for k, fn in enumerate(roles)]
    start = time.monotonic()
    first_checkpoint = int(ws.status()["checkpoint"])
    for t in threads:
        t.start()
    m.stop.wait(SECONDS)  # the point: the load runs this long, unless a worker fails
    m.stop.set()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a worker thread hung"
    assert not m.errors, "\n".join(m.errors[:10])
    ended = time.time()
    wait_for("a refresh of status.json after the load",
             lambda: float(ws.status()["time"]) > ended, timeout=10)
    checkpoints = int(ws.status()["checkpoint"]) - first_checkpoint
    compare(mnt, m, "on the mount")
    mnt = ws.remount(wipe_cache=True)
    checked = compare(mnt, m, "after a remount on an empty cache")
    ws.unmount()
    figures = {"seconds": round(time.monotonic() - start), "ops": dict(m.counts),
               "bytes_written": m.bytes_written, "bytes_compared": checked,
               "files": len(m.expected_tree()), "checkpoints_during_run": checkpoints}
    print(f"\nsoak figures: {json.dumps(figures)}")
    assert checkpoints > SECONDS / 5, "the flusher did not keep publishing during the run"
    assert min(m.counts[k] for k in ("create", "read", "rename", "delete", "dir-rename")) > 0
