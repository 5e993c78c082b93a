"""Many tiny writes to one file: wsfs against local disk and the pyfuse3 floor.

    python benchmarks/appends.py [--count 300000] [--size 4] [--plain] [--rounds 3]

A fresh process opens one new file (O_APPEND unless `--plain`) and writes COUNT writes of
SIZE bytes with os.write, then closes it, on local disk (a temporary directory beside this
machine's other files), on benchmarks/floorfs.py and on a wsfs mount of a `file://` store (no
S3 server needed; nothing here reaches the store before the unmount). Reported per system:
the best of ROUNDS runs (seconds, µs per write, ratio to local disk), the daemon's CPU per
write, and for wsfs the FUSE requests the writes caused, by operation (from the daemon's
`--metrics` endpoint).

What it shows (docs/design.md, "Small writes"): the writeback cache does absorb the data (a
handful of WRITE requests for the whole run), but every write(2) costs one GETXATTR of
`security.capability` round trip, asked by the kernel to decide whether the write must drop
file capabilities. Run from the repository root as root (FUSE mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITER = r"""
import os, sys, time
path, count, size, flags = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = b"x" * (size - 1) + b"\n"
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
start = time.perf_counter()
for _ in range(count):
    os.write(fd, data)
os.close(fd)
print(time.perf_counter() - start)
"""


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU of process `pid` so far (0 without one)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests(port: int | None) -> dict[str, float]:
    """wsfs's FUSE requests so far, by operation (`wsfs_fuse_request_seconds_count`)."""
    if port is None:
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'wsfs_fuse_request_seconds_count\{[^}]*op="(\w+)"\} (\S+)', text)}


def one_run(directory: Path, args: argparse.Namespace, pid: int | None,
            port: int | None) -> tuple[float, float, dict[str, float]]:
    """Seconds, daemon CPU seconds, and requests by operation, of one writer process."""
    flags = 0 if args.plain else os.O_APPEND
    cpu, before = cpu_seconds(pid), requests(port)
    out = subprocess.run([sys.executable, "-c", WRITER, str(directory / "appends.txt"),
                          str(args.count), str(args.size), str(flags)],
                         check=True, capture_output=True, text=True, timeout=3600)
    after = requests(port)
    size = (directory / "appends.txt").stat().st_size
    assert size == args.count * args.size, size
    (directory / "appends.txt").unlink()
    return (float(out.stdout), cpu_seconds(pid) - cpu,
            {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_mounted(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not get mounted")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300_000, help="writes per run")
    ap.add_argument("--size", type=int, default=4, help="bytes per write")
    ap.add_argument("--plain", action="store_true", help="without O_APPEND")
    ap.add_argument("--rounds", type=int, default=3, help="runs per system (best reported)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="wsfs-appends-"))
    env["WSFS_RUN_DIR"] = str(tmp / "run")
    floor_mnt, wsfs_mnt, local = tmp / "floor", tmp / "wsfs", tmp / "local"
    for d in (floor_mnt, wsfs_mnt, local):
        d.mkdir()
    wsfs = [sys.executable, "-m", "wsfs"]
    floor = None
    rows: list[tuple[str, float, float, dict[str, float]]] = []
    try:
        floor = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "floorfs.py"),
                                  str(floor_mnt)], env=env)
        wait_mounted(floor_mnt)
        port = free_port()
        subprocess.run([*wsfs, "init", f"file://{tmp / 'store'}"], env=env, check=True,
                       capture_output=True)
        subprocess.run([*wsfs, "mount", f"file://{tmp / 'store'}", str(wsfs_mnt),
                        "--cache-dir", str(tmp / "cache"), "--metrics", f"127.0.0.1:{port}"],
                       env=env, check=True)
        wsfs_pid = int(json.loads((tmp / "cache" / "status.json").read_text())["pid"])
        systems = [("local", local, None, None), ("floor", floor_mnt, floor.pid, None),
                   ("wsfs", wsfs_mnt, wsfs_pid, port)]
        best: dict[str, tuple[float, float, dict[str, float]]] = {}
        for _ in range(args.rounds):  # interleaved: the machine's load hits all alike
            for name, directory, pid, p in systems:
                run = one_run(directory, args, pid, p)
                if name not in best or run[0] < best[name][0]:
                    best[name] = run
        rows = [(name, *best[name]) for name, *_ in systems]
    finally:
        subprocess.run([*wsfs, "unmount", str(wsfs_mnt)], env=env, capture_output=True)
        if floor is not None:
            subprocess.run(["fusermount3", "-u", str(floor_mnt)], capture_output=True)
            floor.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    kind = "plain" if args.plain else "O_APPEND"
    print(f"{args.count:,} writes of {args.size} bytes ({kind}), best of {args.rounds}:")
    print("| system | seconds | µs/write | x local | daemon CPU µs/write | requests |")
    print("|---|---|---|---|---|---|")
    local_s = rows[0][1]
    for name, seconds, cpu, ops in rows:
        per = ", ".join(f"{op} {n:,.0f}" for op, n in sorted(ops.items()))
        print(f"| {name} | {seconds:.2f} | {seconds / args.count * 1e6:.1f} | "
              f"{seconds / local_s:.0f}x | {cpu / args.count * 1e6:.1f} | {per} |")


if __name__ == "__main__":
    main()
