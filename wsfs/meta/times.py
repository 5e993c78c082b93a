"""The one clock every timestamp wsfs stamps comes from: the kernel's.

Under the writeback cache the kernel stamps mtime and ctime itself (a write, a truncate, a
chmod, a rename or an xattr of a regular file), with the time it stamps every inode with.
Everything else (a new inode, a directory's times) is stamped here. With two clocks a later
change could get an earlier ctime: the daemon's precise time of a create, then the kernel's
coarse time of a write 1 ms later, the last a few milliseconds behind. `make`, rsync and
build caches read that as "older".

The kernel stamps an inode with its coarse clock, CLOCK_REALTIME_COARSE, as ext4 does; but
since Linux 6.13 (multigrain timestamps) with the later of that and a floor: the newest
fine-grained time any filesystem handed out (ext4 and tmpfs do when a file's ctime was read
within the current tick). No clock outside the kernel reads that floor, and on a busy machine
the kernel's stamps were ahead of CLOCK_REALTIME_COARSE most of the time: a file created
right after another was written got the earlier ctime. So wsfs asks the kernel itself: it
stamps a private in-memory file (a memfd) with the current time and reads the stamp back,
~2 us. That stamp is the kernel's own (a fine-grained one moves the floor, so the kernel's
later stamps are later still); without memfd wsfs reads CLOCK_REALTIME_COARSE.
"""

from __future__ import annotations

import os
import time

# <linux/time.h>; Python names it only from 3.13 on
CLOCK_REALTIME_COARSE: int = getattr(time, "CLOCK_REALTIME_COARSE", 5)

_probe: int | None = None  # the memfd stamped by now_ns(); -1 when there is none


def now_ns() -> int:
    """Now, in nanoseconds since the epoch: the time the kernel would stamp an inode with."""
    global _probe
    if _probe is None:
        try:
            _probe = os.memfd_create("wsfs-clock", os.MFD_CLOEXEC)
        except OSError:  # no memfd (a kernel before 3.17, or a seccomp filter)
            _probe = -1
    if _probe >= 0:
        try:
            os.utime(_probe)
            return os.fstat(_probe).st_ctime_ns
        except OSError:
            pass
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
