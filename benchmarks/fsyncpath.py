"""The daemon's side of an fsync(2), without the kernel: wsfs's handlers called directly.

Each round is what fio's random writer sends (benchmarks/bench.py, row h): WRITEs of 4 KiB
at random offsets of a 256 MiB file, the setattr of its mtime, then FSYNC. The rounds
alternate between the ways the fsync's small disk flushes may run (blocks/fsync.py): on
the trio thread while recent ones were fast (`adaptive`, what wsfs does), always in worker
threads (`threads`, what it did), always on the trio thread (`inline`), so that all see the
same machine load, however noisy. Meanwhile a probe task asks for the
file's attributes every millisecond: how long it waits beyond its millisecond is what any
other request waits for the trio thread during an fsync storm.

    python benchmarks/fsyncpath.py [--rounds 1000] [--writes 32] [--modes adaptive,threads]

Prints, per mode: the fsync's latency (median, p99, max), the process's CPU seconds per
round (all threads: what the daemon would spend), the probe's wait (median, p99, max).
`valgrind --tool=callgrind python benchmarks/fsyncpath.py --modes threads --no-probe`
counts the instructions of one mode (two round counts: the difference is per round).
"""

from __future__ import annotations

import argparse
import os
import random
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyfuse3
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from wsfs.blocks import BlockCache  # noqa: E402
from wsfs.blocks import fsync as fsync_module  # noqa: E402
from wsfs.cachedir import CacheDir  # noqa: E402
from wsfs.fs import Operations  # noqa: E402
from wsfs.meta import Metadata  # noqa: E402
from wsfs.store import LocalStore  # noqa: E402

MiB = 1 << 20
BS = MiB


def make_ops(root: Path) -> tuple[Operations, int, pyfuse3.FileHandleT]:
    """wsfs's handlers over a fresh cache dir, as the daemon assembles them (the data
    journal replayed, so in use), and a handle of an empty file."""
    cache = root / "cache"
    cache.mkdir()
    blocks = BlockCache(cache, LocalStore(root / "store"), block_size=BS, cache_size=1 << 30,
                        dirty_limit=1 << 30, limiter=trio.CapacityLimiter(8))
    meta = Metadata(CacheDir(cache).meta_db, hooks=blocks)
    blocks.recover()
    meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, time.time_ns(), nlink=2, ino=1)
    node = meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
    meta.add_entry(1, b"f", node.id)
    ops = Operations(meta, blocks)
    return ops, node.id, pyfuse3.FileHandleT(int(ops._open_handle(node.id, os.O_RDWR).fh))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def run(args: argparse.Namespace, root: Path) -> dict[str, dict[str, float]]:
    ops, ino, fh = make_ops(root)
    size = args.mib * MiB
    chunk = os.urandom(MiB)
    for off in range(0, size, MiB):  # laid out and synced, as fio finds it
        await ops.write(fh, off, chunk)
    await ops.fsync(fh, False)
    modes: list[str] = args.modes.split(",")
    fsyncs: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, float] = dict.fromkeys(modes, 0.0)
    waits: dict[str, list[float]] = {m: [] for m in modes}
    inline = dict.fromkeys(modes, 0)  # rounds whose next small sync would run inline
    mode = modes[0]
    below = fsync_module.INLINE_BELOW
    done = False
    rng = random.Random(42)
    buf = os.urandom(4096)

    async def probe() -> None:
        while not done:
            due = trio.current_time() + 0.001
            await trio.sleep_until(due)
            await ops.getattr(pyfuse3.InodeT(ino))
            waits[mode].append(trio.current_time() - due)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.blocks.maintain)
        if not args.no_probe:
            nursery.start_soon(probe)
        for i in range(args.rounds * len(modes)):
            mode = modes[i % len(modes)]
            ops.blocks.fsyncs.inline = mode != "threads"
            fsync_module.INLINE_BELOW = float("inf") if mode == "inline" else below
            c = time.process_time()
            for _ in range(args.writes):
                await ops.write(fh, rng.randrange(size // 4096) * 4096, buf)
                await trio.sleep(0)  # each request is read from /dev/fuse: a checkpoint
            node = ops._node(ino)
            node.mtime_ns = node.ctime_ns = time.time_ns()  # the kernel's setattr
            ops.meta.save_inode(node)
            t = time.perf_counter()
            await ops.fsync(fh, False)
            fsyncs[mode].append(time.perf_counter() - t)
            inline[mode] += ops.blocks.fsyncs.sync_time < fsync_module.INLINE_BELOW
            cpu[mode] += time.process_time() - c
            await trio.sleep(0)  # (the kernel's next requests come from outside)
        done = True
        nursery.cancel_scope.cancel()
    ms = 1e3
    return {m: {"fsync_p50_ms": statistics.median(fsyncs[m]) * ms,
                "fsync_p99_ms": pct(fsyncs[m], 0.99) * ms,
                "fsync_p999_ms": pct(fsyncs[m], 0.999) * ms,
                "fsync_max_ms": max(fsyncs[m]) * ms,
                "cpu_ms_per_round": cpu[m] / len(fsyncs[m]) * ms,
                **({} if args.no_probe else {
                    "probe_wait_p50_ms": statistics.median(waits[m]) * ms,
                    "probe_wait_p99_ms": pct(waits[m], 0.99) * ms,
                    "probe_wait_max_ms": max(waits[m]) * ms}),
                "inline_share": inline[m] / len(fsyncs[m])} for m in modes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=1000, help="fsyncs per mode")
    p.add_argument("--writes", type=int, default=32, help="4 KiB writes per fsync")
    p.add_argument("--mib", type=int, default=256, help="the file's size")
    p.add_argument("--modes", default="adaptive,threads,inline",
                   help="adaptive, threads and/or inline")
    p.add_argument("--no-probe", action="store_true",
                   help="no probe task (its work grows with the wall time: for callgrind)")
    p.add_argument("--dir", type=Path, help="where the cache dir goes (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = trio.run(run, args, Path(tmp))
    for mode, figures in results.items():
        print(mode, " ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
