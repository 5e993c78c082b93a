"""`wsfs unmount`: flush, unmount, and wait until the daemon has uploaded everything.

Plain `umount` returns before the daemon has uploaded anything; whatever must wait for the
data to be in the store (this command, the container entrypoint, systemd's ExecStop) waits
for the daemon's exit and reads its final state from its status file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import pyfuse3

from .errors import FlushError, MountError
from .progress import Progress
from .runtime import canonical_mountpoint, is_mountpoint, pid_alive, registry_path

log = logging.getLogger(__name__)


def unmount(mountpoint: Path, *, progress: bool, timeout: float | None = None) -> None:
    """`wsfs unmount`: flush, unmount, and wait until the daemon has uploaded everything."""
    mp = canonical_mountpoint(mountpoint)
    reg_path = registry_path(mp)
    try:
        reg = json.loads(reg_path.read_text())
    except (OSError, ValueError):
        reg = None
    if not is_mountpoint(mp):
        raise MountError(f"{mp} is not mounted")
    if reg is None:
        raise MountError(f"{mp} is not a wsfs mount of this machine (no {reg_path}); "
                         "unmount it with `fusermount3 -u`")
    try:
        pyfuse3.syncfs(str(mp))
    except OSError as e:
        log.warning("syncfs(%s) failed: %s", mp, e)
    result = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"cannot unmount {mp}: {result.stderr.strip()}; close the files "
                         "and shells using it and try again")
    wait_for_daemon(int(reg["pid"]), Path(reg["cache_dir"]), progress=progress,
                    timeout=timeout)


def wait_for_daemon(pid: int, cache_dir: Path, *, progress: bool,
                    timeout: float | None) -> None:
    """Wait for the daemon to exit; succeed only if it reported every byte uploaded.

    `progress`: redraw a progress line on stderr (a terminal); it is logged either way.
    """
    status_file = cache_dir / "status.json"
    start = time.monotonic()
    display = Progress("flushing", tty=progress)
    while pid_alive(pid):
        if timeout is not None and time.monotonic() - start > timeout:
            raise FlushError(f"the wsfs daemon (pid {pid}) is still flushing after "
                             f"{timeout:.0f}s; it goes on alone")
        try:
            st = json.loads(status_file.read_text())
        except (OSError, ValueError):
            st = {}
        if st:
            display.update(int(st.get("dirty_bytes", 0)), float(st.get("upload_rate", 0)),
                           int(st.get("dirty_blocks", 0)), note=st.get("last_error"))
        time.sleep(0.2)
    display.finish()
    try:
        st = json.loads(status_file.read_text())
    except (OSError, ValueError):
        st = {}
    if st.get("state") != "done":
        raise FlushError.stopped_early(st, cache_dir)
