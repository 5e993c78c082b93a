"""Timed file operations, each run in its own process by bench.py.

A process of its own for each step means a hung filesystem hangs only this process, which
bench.py kills at its timeout (after tearing the mount down so the stuck system call returns).
Each operation prints the seconds its timed part took, measured here, so interpreter start-up
is not counted.

    python benchmarks/ops.py OPERATION ARGS...
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
SMALL = b"x" * 100  # the content of each small file in the metadata workloads


def write_seq(path: str, size: str) -> float:
    """Write `size` bytes in 1 MiB writes (incompressible, not repeated per MiB), then close."""
    total = int(size)
    pool = os.urandom(MiB + 4096)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        done = 0
        i = 0
        while done < total:
            n = min(MiB, total - done)
            shift = (i * 61) % 4096
            f.write(pool[shift:shift + n])
            done += n
            i += 1
    return time.perf_counter() - t


def read_seq(path: str) -> float:
    """Read a whole file in 1 MiB reads."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    return time.perf_counter() - t


def randwrite(path: str, count: str, fsync_every: str) -> float:
    """`count` 4 KiB writes at random 4 KiB-aligned offsets, fsync after every `fsync_every`."""
    n, every = int(count), int(fsync_every)
    size = os.path.getsize(path)
    rng = random.Random(42)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
    buf = os.urandom(4096)
    t = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    try:
        for i, off in enumerate(offsets, 1):
            os.pwrite(fd, buf, off)
            if i % every == 0:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def sqlite_inserts(path: str, count: str) -> float:
    """`count` transactions of one INSERT each (SQLite's default rollback journal, FULL sync)."""
    t = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    blob = os.urandom(100)
    for i in range(int(count)):
        db.execute("BEGIN")
        db.execute("INSERT INTO t (v, b) VALUES (?, ?)", (f"row {i}", blob))
        db.execute("COMMIT")
    db.close()
    return time.perf_counter() - t


def _names(root: str, files: str, dirs: str) -> tuple[list[Path], list[Path]]:
    nfiles, ndirs = int(files), int(dirs)
    dir_paths = [Path(root) / f"d{d:03d}" for d in range(ndirs)]
    file_paths = [dir_paths[i % ndirs] / f"f{i:06d}.txt" for i in range(nfiles)]
    return dir_paths, file_paths


def create_files(root: str, files: str, dirs: str) -> float:
    """Create `files` small files spread over `dirs` directories under `root`."""
    dir_paths, file_paths = _names(root, files, dirs)
    t = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    for d in dir_paths:
        os.mkdir(d)
    for p in file_paths:
        with open(p, "wb") as f:
            f.write(SMALL)
    return time.perf_counter() - t


def stat_files(root: str, files: str, dirs: str) -> float:
    _, file_paths = _names(root, files, dirs)
    t = time.perf_counter()
    for p in file_paths:
        os.stat(p)
    return time.perf_counter() - t


def delete_files(root: str, files: str, dirs: str) -> float:
    dir_paths, file_paths = _names(root, files, dirs)
    t = time.perf_counter()
    for p in file_paths:
        os.unlink(p)
    for d in dir_paths:
        os.rmdir(d)
    return time.perf_counter() - t


def rename(src: str, dst: str) -> float:
    t = time.perf_counter()
    os.rename(src, dst)
    return time.perf_counter() - t


OPS: dict[str, Callable[..., float]] = {
    "write_seq": write_seq, "read_seq": read_seq, "randwrite": randwrite,
    "sqlite": sqlite_inserts, "create_files": create_files, "stat_files": stat_files,
    "delete_files": delete_files, "rename": rename,
}

if __name__ == "__main__":
    print(f"{OPS[sys.argv[1]](*sys.argv[2:]):.6f}")
