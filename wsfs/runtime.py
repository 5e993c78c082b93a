"""What this machine knows about its wsfs mounts: the registry of running daemons.

A mounted daemon records itself in RUN_DIR (one small JSON file per mountpoint: pid, cache
dir, store) so that `wsfs unmount`, `wsfs status`, `wsfs sync` and the helpers can find the
daemon behind a mountpoint, wait for it, and read its status file in the cache dir.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)



def default_run_dir() -> Path:
    """/run/wsfs for root; for another user, who cannot write there, $XDG_RUNTIME_DIR/wsfs
    (else ~/.cache/wsfs/run): each user's `wsfs status` lists that user's mounts."""
    if os.geteuid() == 0:
        return Path("/run/wsfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "wsfs"
    return Path.home() / ".cache" / "wsfs" / "run"


RUN_DIR = Path(os.environ.get("WSFS_RUN_DIR") or default_run_dir())


def canonical_mountpoint(path: Path) -> Path:
    """`path` as the kernel names it once mounted (/proc/self/mounts): absolute, with `..` and
    every symlink resolved, so that `wsfs unmount ../ws` or a /workspace that is a symlink
    finds the mount. The last component is resolved by readlink(2), never stat(2): on a
    mountpoint whose daemon hangs, a stat hangs too, and readlink does not reach the
    filesystem mounted there."""
    path = path.absolute()
    for _ in range(40):  # the kernel's own limit of links in one path
        if path.name in ("", ".", ".."):
            return Path(os.path.realpath(path))
        path = Path(os.path.realpath(path.parent)) / path.name
        try:
            target = os.readlink(path)
        except OSError:  # not a symlink (EINVAL), or not there
            return path
        path = path.parent / target
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))


def registry_path(mountpoint: Path) -> Path:
    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"{key}.json"


def write_registry(mountpoint: Path, cache_dir: Path, store_url: str, *,
                   view: bool = False) -> None:
    """Record this process as the daemon serving `mountpoint` (`view`: a read-only mount of
    a checkpoint, which no `remount,rw` makes writable).

    Readable by all, unlike the daemon's other files (its umask is 077): it says no more than
    /proc/self/mounts, and lets any user's `wsfs status` list the mount."""
    if not RUN_DIR.exists():
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        RUN_DIR.chmod(0o755)
    fd = os.open(registry_path(mountpoint), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with open(fd, "w") as f:
        os.fchmod(fd, 0o644)
        f.write(json.dumps({"pid": os.getpid(), "pid_start": process_start(os.getpid()),
                            "mountpoint": str(mountpoint), "cache_dir": str(cache_dir),
                            "store": store_url, **({"view": True} if view else {})}))


def read_registry(path: Path) -> dict[str, Any] | None:
    """One record `write_registry` wrote; None if it is not there or cannot be read."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def mount_field(field: str) -> str:
    r"""A path or source field of /proc/self/mounts or mountinfo as it is: the kernel writes
    space, tab, newline and backslash there as octal escapes (\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo: where a filesystem is mounted and what it is."""

    mountpoint: Path
    fstype: str  # "fuse.wsfs" for a wsfs mount
    source: str  # the store URL for a wsfs mount
    device: str  # "major:minor": a FUSE mount's minor names its /sys/fs/fuse/connections/N
    options: frozenset[str] = frozenset()  # this mount's (ro, nosuid, noatime, ...)
    super_options: frozenset[str] = frozenset()  # its filesystem's (allow_other, ...)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, oldest first (a later one on the same mountpoint is
    mounted over the earlier)."""
    found = []
    for line in text.splitlines():
        # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        found.append(Mount(Path(mount_field(fields[4])), tail[0],
                           mount_field(tail[1]) if len(tail) > 1 else "", fields[2],
                           frozenset(fields[5].split(",")) if len(fields) > 5 else frozenset(),
                           frozenset(tail[2].split(",")) if len(tail) > 2 else frozenset()))
    return found


def mounts() -> list[Mount]:
    """The mounts of this mount namespace, oldest first. Read from mountinfo, never by
    stat(2): a stat of a mount whose daemon hangs would hang too."""
    return parse_mountinfo(MOUNTINFO.read_text())


def is_mountpoint(path: Path) -> bool:
    return any(str(m.mountpoint) == str(path) for m in mounts())


def mount_of(path: Path) -> Mount | None:
    """The filesystem that holds `path` (an existing, resolved path): the deepest mount above
    it, the last one mounted where several are stacked on one mountpoint."""
    best: Mount | None = None
    try:
        found = mounts()
    except OSError:
        return None
    for m in found:
        if (path == m.mountpoint or m.mountpoint in path.parents) and (
                best is None or len(m.mountpoint.parts) >= len(best.mountpoint.parts)):
            best = m
    return best


def force_unmount(path: Path, *, timeout: float = 30) -> None:
    """Unmount `path` while it is mounted, whatever holds it: `fusermount3 -u`, then `-uz`
    (lazily: files still open there fail from now on) if it stays mounted. For a mount whose
    daemon is gone, and for the teardown of tests and benchmarks."""
    for flag in ("-u", "-uz"):
        if not is_mountpoint(path):
            return
        result = subprocess.run(["fusermount3", flag, str(path)], capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0 and flag == "-u":
            log.warning("fusermount3 -u %s failed (%s): unmounting lazily", path,
                        result.stderr.strip())


def wsfs_mount_options(path: str | Path) -> tuple[frozenset[str], frozenset[str]] | None:
    """The per-mount and the superblock options of the wsfs mount on `path`, the last one
    stacked there; None if there is none. A `mount -o remount,ro` shows as `ro` in both."""
    found = [m for m in mounts() if m.fstype == "fuse.wsfs" and str(m.mountpoint) == str(path)]
    return (found[-1].options, found[-1].super_options) if found else None


def mounted_read_only(path: str | Path) -> bool:
    """Whether the kernel holds the wsfs mount on `path` read-only (its superblock: what
    `mount -o remount,ro` sets); True if it is not mounted."""
    found = wsfs_mount_options(path)
    return found is None or "ro" in found[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat);
    None if there is no such process. With the pid it names one process for good: a pid is
    reused, a (pid, start) pair is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def daemon_alive(pid: int, start: int | None) -> bool:
    """Whether the daemon recorded as (`pid`, `start`) still runs: a dead daemon's pid may
    be another process's by now (`start` None: recorded by an older wsfs, trust the pid)."""
    return pid_alive(pid) and (start is None or process_start(pid) == start)


def syncfs(path: str | Path) -> None:
    """syncfs(2): the kernel hands every dirty page of the filesystem at `path` to its daemon.

    Not pyfuse3.syncfs, which holds the GIL for the whole call: in the daemon, on its own
    mount, that deadlocks as soon as the kernel holds a dirty page of a file still open (the
    kernel waits for the daemon to take the page, and the daemon's FUSE thread waits for the
    GIL); in `wsfs run` it would freeze the supervisor's signal handling. ctypes releases the
    GIL around the foreign call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, when it is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError as e:
            log.warning("could not notify systemd: %s", e)


# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
GIL_SWITCH_INTERVAL = 0.0005


def favour_the_fuse_thread() -> None:
    """Shorten how long the FUSE thread can wait for the GIL behind a worker.

    While uploads run, worker threads spend milliseconds in Python at a time (botocore builds
    and parses every request); the FUSE thread, back from its read of /dev/fuse, waited for
    the GIL up to Python's 5 ms switch interval per request. At 0.5 ms, in seven interleaved
    pairs of the benchmark's metadata rows (flushes running meanwhile), creating 1,000 files
    went from 1.02-1.42x the floor to 0.82-1.18x, stat from 0.97-1.35x to 0.68-1.11x, delete
    from 1.42-1.74x to 1.26-1.77x (better in 6 of 7); the sequential, random-write and SQLite
    rows did not move. 0.1 ms gained nothing more there (two pairs; each switch costs CPU).
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


M_ARENA_MAX = -8  # glibc's mallopt(3) parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas before the daemon starts its worker threads.

    glibc gives each thread that allocates concurrently an arena of its own and rarely returns
    their memory; with 32 upload threads each handling megabytes (blocks, packs, checkpoint
    pages), a daemon creating 30,000 files peaked at 234 MB RSS, and 171 MB with two arenas
    (measured through a real mount). A no-op where mallopt does not exist (musl).
    """
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        log.debug("mallopt is not available: malloc arenas are not capped")
