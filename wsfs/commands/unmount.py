"""`wsfs unmount`: flush, unmount, and wait until the daemon has uploaded everything.

Plain `umount` returns before the daemon has uploaded anything; whatever must wait for the
data to be in the store (this command, the container entrypoint, systemd's ExecStop) waits
for the daemon's exit and reads its final state from its status file.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from ..cachedir import CacheDir
from ..daemon.status import entry_of, read_status
from ..errors import DaemonGoneError, FlushError, MountError
from ..progress import Progress, closing
from ..runtime import (
    canonical_mountpoint,
    daemon_alive,
    force_unmount,
    is_mountpoint,
    read_registry,
    registry_path,
    syncfs,
)

log = logging.getLogger(__name__)


def unmount(mountpoint: Path, *, progress: bool, timeout: float | None = None) -> None:
    """`wsfs unmount`: flush, unmount, and wait until the daemon has uploaded everything.

    `progress`: count down on stderr (a terminal) and end with a closing line; the log gets
    the progress either way.
    """
    start = time.monotonic()
    mp = canonical_mountpoint(mountpoint)
    reg_path = registry_path(mp)
    reg = read_registry(reg_path)
    if reg is not None and read_status(entry_of(reg))["state"] == "dead":
        clear_dead_mount(mp, reg_path, reg)
    if not is_mountpoint(mp):
        raise MountError(f"{mp} is not mounted")
    if reg is None:
        raise MountError(f"{mp} is not a wsfs mount of this machine (no {reg_path}); "
                         "unmount it with `fusermount3 -u`")
    cache_dir = Path(reg["cache_dir"])
    uploaded_before = int(CacheDir(cache_dir).read_status().get("uploaded_bytes", 0))
    try:
        syncfs(mp)
    except OSError as e:
        log.warning("syncfs(%s) failed: %s", mp, e)
    result = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"cannot unmount {mp}: {result.stderr.strip()}; close the files "
                         "and shells using it and try again")
    display = Progress(f"flushing {mp}", tty=progress)
    try:
        st = wait_for_daemon(int(reg["pid"]), cache_dir, display=display, timeout=timeout,
                             pid_start=reg.get("pid_start"))
    except BaseException:
        display.finish()
        raise
    display.finish(closing(int(st.get("uploaded_bytes", 0)) - uploaded_before,
                           f"unmounted {mp}", time.monotonic() - start, st.get("checkpoint")))


def clear_dead_mount(mp: Path, reg_path: Path, reg: dict[str, object]) -> None:
    """Unmount a mount whose daemon was killed (every access to it fails with ENOTCONN),
    forget its registry record, and raise DaemonGoneError: nothing was uploaded."""
    force_unmount(mp)  # busy: detached, the files open there fail anyway
    reg_path.unlink(missing_ok=True)
    raise DaemonGoneError(
        f"the daemon of {mp} (pid {reg['pid']}) was gone (killed or crashed): {mp} is "
        f"unmounted now; mount it again with the cache dir {reg['cache_dir']}: the next "
        "mount uploads the data the daemon had not saved")


def wait_for_daemon(pid: int, cache_dir: Path, *, display: Progress, timeout: float | None,
                    pid_start: object = None) -> dict[str, Any]:
    """Wait for the daemon to exit, showing what is left on `display`; return its last
    status if it reported every byte uploaded, else raise FlushError."""
    start = time.monotonic()
    while daemon_alive(pid, pid_start if isinstance(pid_start, int) else None):
        if timeout is not None and time.monotonic() - start > timeout:
            raise FlushError(f"the wsfs daemon (pid {pid}) is still flushing after "
                             f"{timeout:.0f}s; it goes on alone")
        st = CacheDir(cache_dir).read_status()
        if st:
            display.update(int(st.get("dirty_bytes", 0)), float(st.get("upload_rate", 0)),
                           int(st.get("dirty_blocks", 0)), note=st.get("last_error"))
        time.sleep(0.2)
    st = CacheDir(cache_dir).read_status()
    if st.get("state") != "done":
        raise FlushError.stopped_early(st, cache_dir)
    return st
