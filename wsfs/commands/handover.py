"""A mount that finds the previous daemon of its cache dir still uploading waits for it.

After a plain `umount` (or `fusermount3 -u`, or a service restart whose stop did not wait)
the daemon goes on uploading what its mount left, holding the cache dir's lock (one daemon
per cache dir) until it is done. A mount of the same cache dir started meanwhile used to fail
at once ("another wsfs daemon is using the cache dir"); what it needs is only to wait. So
`wsfs mount` looks at the holder before anything is taken: if its status says it is finishing
(unmounted, flushing), the mount waits for the lock, showing the holder's progress (a live
line at a terminal; a line on stderr and systemd's STATUS= otherwise), up to
`--handover-timeout` seconds, then fails with one sentence. A holder that still serves a mount
is refused at once, as before: it will not let go by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
import time
from pathlib import Path
from typing import Any

from ..cachedir import CacheDir
from ..errors import LeaseError, MountError
from ..progress import Progress, describe
from ..runtime import is_mountpoint, sd_notify

POLL = 0.2  # seconds between two looks at the lock
SAY_EVERY = 5.0  # seconds between two progress lines where no terminal redraws one


def lock_holder(cache_dir: Path) -> str | None:
    """The pid (as the lock file has it) of the process holding the cache dir's lock, None
    when it is free (looked at by taking and dropping it at once)."""
    try:
        # Opened to read: a cache dir without a lock file had no daemon, and a mount that
        # fails later must leave nothing behind (nor a file readable by others).
        f = open(CacheDir(cache_dir).lock)  # noqa: SIM115 - closed below, lock and all
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "unknown"
        return None  # closing drops the lock


def finishing(st: dict[str, Any], holder: str) -> bool:
    """Whether the status says its daemon, the lock's holder, is past serving: unmounted and
    uploading what is left (or just done, and about to exit)."""
    if str(st.get("pid")) != holder:
        return False
    state = st.get("state")
    if state in ("flushing", "done", "failed"):
        return True
    return state == "serving" and not is_mountpoint(Path(str(st.get("mountpoint"))))


def wait_for_previous_daemon(cache_dir: Path, timeout: float) -> None:
    """Return once no daemon holds `cache_dir`; wait up to `timeout` seconds for one that is
    finishing its final upload; raise for one that serves, or that outlasts the wait."""
    holder = lock_holder(cache_dir)
    if holder is None:
        return
    if not finishing(CacheDir(cache_dir).read_status(), holder):
        raise LeaseError(
            f"another wsfs daemon (pid {holder} on this host) is using the cache dir "
            f"{cache_dir}; unmount it first or choose another --cache-dir")
    tty = sys.stderr.isatty()
    display = Progress(f"waiting for pid {holder}", tty=tty)
    deadline = time.monotonic() + timeout
    said = -float("inf")  # when a line was last printed (not at a terminal)
    try:
        while lock_holder(cache_dir) is not None:
            if time.monotonic() >= deadline:
                raise MountError(
                    f"the previous daemon of the cache dir {cache_dir} (pid {holder}) is "
                    f"still uploading after {timeout:g}s; mount again once it is done "
                    "(`wsfs status` shows it), or wait longer with -o handover_timeout=SECONDS")
            st = CacheDir(cache_dir).read_status()
            left, rate = int(st.get("dirty_bytes", 0)), float(st.get("upload_rate", 0))
            figures = describe(left, rate, int(st.get("dirty_blocks", 0)))
            if said < 0 or (not tty and time.monotonic() - said >= SAY_EVERY):
                said = time.monotonic()
                print(f"wsfs: the previous daemon of {cache_dir} (pid {holder}) is still "
                      f"uploading what its mount left ({figures}); waiting up to "
                      f"{timeout:.0f}s for it", file=sys.stderr, flush=True)
            display.update(left, rate, int(st.get("dirty_blocks", 0)),
                           note=st.get("last_error"))
            # Under systemd (Type=notify), say why the start takes long, and that it may.
            sd_notify(f"STATUS=waiting for the previous daemon (pid {holder}): {figures}\n"
                      f"EXTEND_TIMEOUT_USEC={int(SAY_EVERY * 2e6)}")
            time.sleep(POLL)
    finally:
        with contextlib.suppress(Exception):
            display.finish()
    print(f"wsfs: the previous daemon of {cache_dir} is done; mounting", file=sys.stderr,
          flush=True)
