"""How long a container stop takes: `wsfs run` from SIGTERM to every byte in the store.

    python benchmarks/stoptime.py [--backlog-mib 64,256] [--rate-mib 16,0] [--grace 3]

For each backlog and upload bandwidth: a fresh bucket on a local moto server, reached through
tests/faultproxy.py (throttled to RATE MiB/s of uploads; 0 = no limit); `wsfs run` with a
child that writes BACKLOG MiB of incompressible data into the workspace (flush delay 300 s, so
all of it is still dirty), then SIGTERM. The child exits at once on SIGTERM (a notebook server
stopping its kernels); `--child-ignores` makes it ignore SIGTERM for its whole `--grace`
instead. Reported: seconds from SIGTERM until `wsfs run` exits 0, which it does only after the
daemon uploaded every block and published the final checkpoint, and the effective rate.
Run from the repository root with the test dependencies installed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from faultproxy import FaultProxy  # noqa: E402
from s3servers import S3Server, start_moto  # noqa: E402

CHILD = r"""
import os, signal, sys, time
mnt, size, out, ignore = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else lambda *a: sys.exit(0))
with open(os.path.join(mnt, "backlog.bin"), "wb") as f:
    for _ in range(size >> 20):
        f.write(os.urandom(1 << 20))
open(out, "w").close()
while True:
    time.sleep(0.1)
"""


def dirty_bytes(cache_dir: Path) -> int:
    import json

    try:
        return int(json.loads((cache_dir / "status.json").read_text())["dirty_bytes"])
    except (OSError, ValueError, KeyError):
        return 0


def one_stop(server: S3Server, backlog: int, rate: float, grace: float, ignore: bool,
             tree: Path) -> float:
    """Seconds from SIGTERM to `wsfs run`'s exit, for one fresh workspace."""
    bucket = f"stop-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    with tempfile.TemporaryDirectory(prefix="wsfs-stoptime-") as tmp, \
            FaultProxy(server.endpoint_url) as proxy:
        root = Path(tmp)
        env = {**server.env(), "AWS_ENDPOINT_URL": proxy.url, "WSFS_RUN_DIR": str(root / "run")}
        store = f"s3://{bucket}/ws"
        wsfs = [sys.executable, "-m", "wsfs"]
        subprocess.run([*wsfs, "init", store], env=env, check=True, capture_output=True,
                       cwd=tree)
        (root / "mnt").mkdir()
        (root / "child.py").write_text(CHILD)
        ready = root / "ready"
        cache = root / "cache"
        with open(root / "run.log", "wb") as log:
            proc = subprocess.Popen(
                [*wsfs, "run", "--mount", store, str(root / "mnt"), "--data-dir", "",
                 "--cache-dir", str(cache), "--flush-delay", "300", "--stop-timeout",
                 str(grace), "--", sys.executable, str(root / "child.py"), str(root / "mnt"),
                 str(backlog), str(ready), "1" if ignore else "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tree)
        try:
            deadline = time.monotonic() + 600
            while not ready.exists() or dirty_bytes(cache) < backlog:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((root / "run.log").read_text())
                time.sleep(0.1)
            proxy.throttle(rate or None)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(900)
            took = time.monotonic() - start
            if code != 0:
                raise SystemExit(f"wsfs run exited {code}:\n{(root / 'run.log').read_text()}")
            return took
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-uz", str(root / "mnt")], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backlog-mib", default="64,256", help="comma-separated backlogs")
    p.add_argument("--rate-mib", default="16,0", help="comma-separated MiB/s; 0: no limit")
    p.add_argument("--grace", type=float, default=3.0, help="wsfs run --stop-timeout")
    p.add_argument("--child-ignores", action="store_true",
                   help="the child ignores SIGTERM (takes its whole grace)")
    p.add_argument("--tree", type=Path, default=ROOT,
                   help="the source tree whose wsfs package runs (e.g. an older one, exported "
                   "with `git archive`, to compare)")
    args = p.parse_args()
    os.chdir(ROOT)
    server = start_moto()
    try:
        child = (f"ignores SIGTERM for {args.grace:g} s" if args.child_ignores
                 else "exits at SIGTERM")
        print("| backlog | upload bandwidth | child | SIGTERM to all in store | effective |")
        print("|---:|---:|---|---:|---:|")
        for rate_mib in (float(x) for x in args.rate_mib.split(",")):
            for backlog_mib in (int(x) for x in args.backlog_mib.split(",")):
                took = one_stop(server, backlog_mib << 20, rate_mib * (1 << 20), args.grace,
                                args.child_ignores, args.tree.resolve())
                bandwidth = f"{rate_mib:g} MiB/s" if rate_mib else "local moto, no limit"
                print(f"| {backlog_mib} MiB | {bandwidth} | {child} | {took:.1f} s | "
                      f"{backlog_mib / took:.0f} MiB/s |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
