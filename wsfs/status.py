"""`wsfs status` and `wsfs sync`: what a running mount has not yet saved, and saving it now.

Both read what the daemon publishes locally, so they work without touching the store: the
registry file `RUN_DIR/<hash of mountpoint>.json` (pid, cache dir, store) and the daemon's
`cache_dir/status.json`, rewritten every half second (see `Daemon.status` for its fields).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .control import SyncRequest
from .errors import FlushError, MountError
from .progress import Progress, human_bytes, human_seconds
from .runtime import (
    RUN_DIR,
    canonical_mountpoint,
    is_mountpoint,
    mount_field,
    pid_alive,
    registry_path,
)

log = logging.getLogger(__name__)

STALE_AFTER = 5.0  # a status.json older than this means the daemon is stuck or gone


@dataclass(frozen=True, slots=True)
class MountEntry:
    """A wsfs mount of this machine, from the registry (or only from /proc/mounts)."""

    mountpoint: str
    pid: int | None
    cache_dir: str | None
    store: str | None


def _proc_wsfs_mounts() -> dict[str, str]:
    """Mountpoint -> source of every wsfs FUSE mount in this mount namespace."""
    found = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "fuse.wsfs":
                found[mount_field(fields[1])] = mount_field(fields[0])
    return found


def list_mounts() -> list[MountEntry]:
    """Every wsfs mount of this machine: the registry's, then kernel mounts it lacks."""
    entries: dict[str, MountEntry] = {}
    try:
        files = sorted(RUN_DIR.glob("*.json"))
    except OSError:
        files = []
    for p in files:
        try:
            reg = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        entries[reg["mountpoint"]] = MountEntry(reg["mountpoint"], int(reg["pid"]),
                                                reg["cache_dir"], reg.get("store"))
    for mp, source in _proc_wsfs_mounts().items():
        entries.setdefault(mp, MountEntry(mp, None, None, source))
    return sorted(entries.values(), key=lambda e: e.mountpoint)


def registry_entry(mountpoint: Path) -> MountEntry:
    """The registry entry of a mounted wsfs, or a MountError that says what is wrong."""
    mp = canonical_mountpoint(mountpoint)
    path = registry_path(mp)
    try:
        reg = json.loads(path.read_text())
    except (OSError, ValueError):
        reg = None
    if reg is None:
        if is_mountpoint(mp):
            raise MountError(f"{mp} is mounted but not registered in {RUN_DIR}; set "
                             "WSFS_RUN_DIR to the run dir its daemon was started with")
        raise MountError(f"{mp} is not a wsfs mount; list the mounts with `wsfs status`")
    return MountEntry(reg["mountpoint"], int(reg["pid"]), reg["cache_dir"], reg.get("store"))


def read_status(entry: MountEntry) -> dict[str, Any]:
    """The daemon's status.json, with `alive` and `stale` added; {} when there is none."""
    st: dict[str, Any] = {}
    if entry.cache_dir is not None:
        try:
            st = dict(json.loads((Path(entry.cache_dir) / "status.json").read_text()))
        except (OSError, ValueError):
            st = {}
    st.setdefault("mountpoint", entry.mountpoint)
    st.setdefault("store", entry.store)
    st.setdefault("cache_dir", entry.cache_dir)
    st.setdefault("pid", entry.pid)
    alive = entry.pid is not None and pid_alive(entry.pid)
    st["alive"] = alive
    st["stale"] = alive and time.time() - float(st.get("time") or 0) > STALE_AFTER
    if st.get("last_checkpoint_time") is not None:
        st["checkpoint_age"] = time.time() - float(st["last_checkpoint_time"])
    return st


def format_status(st: dict[str, Any]) -> str:
    """A person's view of one mount's status."""
    now = time.time()
    state = st.get("state", "unknown")
    if not st.get("alive"):
        state = "no daemon (registry only)" if st.get("pid") else "unknown (not in the registry)"
    elif st.get("stale"):
        state += f" (no update for {human_seconds(now - float(st.get('time') or 0))}: stuck?)"
    head = f"{st['mountpoint']}: {state}"
    if st.get("pid"):
        head += f" (pid {st['pid']}"
        if st.get("started"):
            head += f", up {human_seconds(now - float(st['started']))}"
        head += ")"
    lines = [head, f"  store:       {st.get('store')}", f"  cache dir:   {st.get('cache_dir')}"]
    if "dirty_bytes" not in st:
        return "\n".join(lines)
    lines.append(f"  unsaved:     {human_bytes(st['dirty_bytes'])} in {st['dirty_blocks']} "
                 f"dirty blocks (writers wait above {human_bytes(st.get('dirty_limit', 0))})")
    lines.append(f"  uploading:   {st.get('uploading_blocks', 0)} blocks "
                 f"({human_bytes(st.get('uploading_bytes', 0))}) at "
                 f"{human_bytes(st.get('upload_rate', 0))}/s; "
                 f"{st.get('uploaded_blocks', 0)} blocks, "
                 f"{human_bytes(st.get('uploaded_bytes', 0))} since mount")
    ckpt = f"  checkpoint:  #{st.get('checkpoint', 0)}"
    if st.get("checkpoint_age") is not None:
        ckpt += f", published {human_seconds(st['checkpoint_age'])} ago"
    else:
        ckpt += " (none published by this mount yet)"
    lines.append(ckpt)
    lines.append(f"  cache:       {human_bytes(st.get('cache_bytes', 0))} of "
                 f"{human_bytes(st.get('cache_limit', 0))} "
                 f"({st.get('cache_hits', 0)} hits, {st.get('cache_misses', 0)} misses)")
    lease = st.get("lease")
    if lease:
        text = f"  lease:       held by this mount (host {lease['host']}, pid {lease['pid']})"
        if lease.get("renewed"):
            text += f", renewed {human_seconds(now - float(lease['renewed']))} ago"
        if lease.get("error"):
            text += f"; renewal failing: {lease['error']}"
        lines.append(text)
    err = (f"  errors:      {st.get('errors', 0)} failed flushes, "
           f"{st.get('retries', 0)} retries")
    if st.get("last_error"):
        err += f"; last: {st['last_error']}"
    lines.append(err)
    if st.get("metrics"):
        lines.append(f"  metrics:     http://{st['metrics']}/metrics")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per mount: the answer to "is everything saved?" for the whole machine."""
    if not rows:
        return "no wsfs mounts on this machine"
    out = [f"{'MOUNTPOINT':<30} {'STATE':<10} {'UNSAVED':>10} {'CHECKPOINT':<16} STORE"]
    for st in rows:
        state = (st.get("state", "?") if st.get("alive")
                 else "gone" if st.get("pid") else "unregistered")
        if st.get("stale"):
            state += "?"
        age = st.get("checkpoint_age")
        ckpt = f"#{st.get('checkpoint', '?')}" + (f" {human_seconds(age)} ago"
                                                  if age is not None else "")
        unsaved = human_bytes(st["dirty_bytes"]) if "dirty_bytes" in st else "?"
        out.append(f"{st['mountpoint']:<30} {state:<10} {unsaved:>10} {ckpt:<16} "
                   f"{st.get('store')}")
    return "\n".join(out)


def show(mountpoint: Path | None, *, as_json: bool) -> str:
    """The text `wsfs status` prints."""
    if mountpoint is None:
        rows = [read_status(e) for e in list_mounts()]
        return json.dumps(rows, indent=1) if as_json else format_table(rows)
    st = read_status(registry_entry(mountpoint))
    return json.dumps(st, indent=1) if as_json else format_status(st)


def sync(mountpoint: Path, *, progress: bool, timeout: float | None = None) -> str:
    """Publish everything written to `mountpoint` so far; return a one-line summary.

    The kernel first hands over the pages it still caches (syncfs), then the daemon is asked
    for a flush cycle that starts after the request (see wsfs.control). Raises FlushError if
    the daemon reports a failure, goes away before finishing, or the timeout passes.
    """
    import pyfuse3

    entry = registry_entry(mountpoint)
    assert entry.pid is not None and entry.cache_dir is not None
    if not pid_alive(entry.pid):
        raise MountError(f"the wsfs daemon of {entry.mountpoint} (pid {entry.pid}) is gone; "
                         "unmount it with `fusermount3 -u` and mount it again")
    try:
        pyfuse3.syncfs(entry.mountpoint)
    except OSError as e:
        log.warning("syncfs(%s) failed: %s", entry.mountpoint, e)
    start = time.monotonic()
    request = SyncRequest(Path(entry.cache_dir))
    request.send(entry.pid)
    display = Progress(f"syncing {entry.mountpoint}", tty=progress)
    try:
        while True:
            answer = request.answer()
            st = read_status(entry)
            if answer is not None:
                ok, error = answer
                if not ok:
                    raise FlushError(f"the sync of {entry.mountpoint} failed ({error}); the "
                                     "data stays in the cache dir and the daemon keeps trying")
                return (f"synced {entry.mountpoint}: checkpoint #{st.get('checkpoint')} "
                        f"in {human_seconds(time.monotonic() - start)}")
            if not pid_alive(entry.pid):
                if st.get("state") == "done":  # unmounted meanwhile: the final flush saved all
                    return f"synced {entry.mountpoint}: it was unmounted and fully uploaded"
                raise FlushError(f"the wsfs daemon of {entry.mountpoint} stopped before the "
                                 f"sync finished ({st.get('last_error')})")
            if timeout is not None and time.monotonic() - start > timeout:
                raise FlushError(f"the sync of {entry.mountpoint} did not finish within "
                                 f"{timeout:.0f}s ({st.get('last_error') or 'still uploading'}"
                                 "); the daemon keeps trying")
            display.update(int(st.get("dirty_bytes", 0)), float(st.get("upload_rate", 0)),
                           int(st.get("dirty_blocks", 0)), note=st.get("last_error"))
            time.sleep(0.1)
    finally:
        display.finish()
        request.cancel()

