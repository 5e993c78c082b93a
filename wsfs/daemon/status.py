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

from ..cachedir import CacheDir
from ..errors import DaemonGoneError, FlushError, MountError
from ..progress import Progress, closing, human_bytes, human_seconds
from ..runtime import (
    RUN_DIR,
    canonical_mountpoint,
    daemon_alive,
    is_mountpoint,
    mounts,
    read_registry,
    registry_path,
)
from .control import SyncRequest

log = logging.getLogger(__name__)

STALE_AFTER = 5.0  # a status.json older than this means the daemon is stuck or gone


@dataclass(frozen=True, slots=True)
class MountEntry:
    """A wsfs mount of this machine, from the registry (or only from /proc/mounts)."""

    mountpoint: str
    pid: int | None
    cache_dir: str | None
    store: str | None
    pid_start: int | None = None  # the daemon's start (runtime.process_start): pid reuse


def _proc_wsfs_mounts() -> dict[str, str]:
    """Mountpoint -> source of every wsfs FUSE mount in this mount namespace."""
    return {str(m.mountpoint): m.source for m in mounts() if m.fstype == "fuse.wsfs"}


def list_mounts() -> list[MountEntry]:
    """Every wsfs mount of this machine: the registry's, then kernel mounts it lacks."""
    entries: dict[str, MountEntry] = {}
    try:
        files = sorted(RUN_DIR.glob("*.json"))
    except OSError:
        files = []
    for p in files:
        if (reg := read_registry(p)) is None:
            continue
        entries[reg["mountpoint"]] = entry_of(reg)
    for mp, source in _proc_wsfs_mounts().items():
        entries.setdefault(mp, MountEntry(mp, None, None, source))
    return sorted(entries.values(), key=lambda e: e.mountpoint)


def registry_entry(mountpoint: Path) -> MountEntry:
    """The registry entry of a mounted wsfs, or a MountError that says what is wrong."""
    mp = canonical_mountpoint(mountpoint)
    reg = read_registry(registry_path(mp))
    if reg is None:
        if is_mountpoint(mp):
            raise MountError(f"{mp} is mounted but not registered in {RUN_DIR}; set "
                             "WSFS_RUN_DIR to the run dir its daemon was started with")
        raise MountError(f"{mp} is not a wsfs mount; list the mounts with `wsfs status`")
    return entry_of(reg)


def entry_of(reg: dict[str, Any]) -> MountEntry:
    """A registry file's record."""
    return MountEntry(reg["mountpoint"], int(reg["pid"]), reg["cache_dir"], reg.get("store"),
                      reg.get("pid_start"))


def read_status(entry: MountEntry) -> dict[str, Any]:
    """The daemon's status.json, with `alive`, `stale` and `mounted` added.

    A registered daemon that no longer runs (or whose pid is another process's by now) was
    killed or crashed: its `state` becomes "dead", whatever it last wrote (kept as
    `last_state`), and its figures are those of its last moment.
    """
    st = {} if entry.cache_dir is None else CacheDir(Path(entry.cache_dir)).read_status()
    st.setdefault("mountpoint", entry.mountpoint)
    st.setdefault("store", entry.store)
    st.setdefault("cache_dir", entry.cache_dir)
    st.setdefault("pid", entry.pid)
    start = entry.pid_start
    if start is None and st.get("pid") == entry.pid:
        start = st.get("pid_start")
    alive = entry.pid is not None and daemon_alive(entry.pid, start)
    st["alive"] = alive
    st["mounted"] = is_mountpoint(Path(entry.mountpoint))
    if entry.pid is not None and not alive and st.get("state") not in ("done", "failed"):
        st["last_state"], st["state"] = st.get("state"), "dead"
    st["stale"] = alive and time.time() - float(st.get("time") or 0) > STALE_AFTER
    if st.get("last_checkpoint_time") is not None:
        st["checkpoint_age"] = time.time() - float(st["last_checkpoint_time"])
    return st


def format_status(st: dict[str, Any]) -> str:
    """A person's view of one mount's status."""
    now = time.time()
    state = st.get("state", "unknown")
    if st.get("pid") is None:
        state = "unknown (not in the registry)"
    elif state == "dead":
        return _format_dead(st)
    elif st.get("stale"):
        state += f" (no update for {human_seconds(now - float(st.get('time') or 0))}: stuck?)"
    head = f"{st['mountpoint']}: {state}"
    if st.get("pid"):
        head += f" (pid {st['pid']}"
        if st.get("started"):
            head += f", up {human_seconds(now - float(st['started']))}"
        head += ")"
    lines = [head, f"  store:       {st.get('store')}", f"  cache dir:   {st.get('cache_dir')}"]
    if st.get("view"):
        return "\n".join(lines + _view_lines(st, st["view"], now))
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
        ckpt += " (none published by this mount yet"
        if st.get("started"):
            ckpt += f"; mounted {human_seconds(now - float(st['started']))} ago"
        ckpt += ")"
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
        if st.get("fenced"):
            text = "  lease:       LOST (fenced)"
        lines.append(text)
    lines.extend(_fencing_lines(st))
    err = (f"  errors:      {st.get('errors', 0)} failed flushes, "
           f"{st.get('retries', 0)} retries")
    if st.get("last_error"):
        err += f"; last: {st['last_error']}"
    lines.append(err)
    if st.get("metrics"):
        lines.append(f"  metrics:     http://{st['metrics']}/metrics")
    return "\n".join(lines)


def _view_lines(st: dict[str, Any], view: dict[str, Any], now: float) -> list[str]:
    """A read-only mount's (daemon/view.py): which checkpoint it shows, and how it follows."""
    shown = f"  read-only:   checkpoint #{view.get('checkpoint')}"
    if view.get("published"):
        shown += f", published {human_seconds(now - float(view['published']))} ago"
    if not view.get("following"):
        shown += f" (--at {view.get('at')}); no lease"
        lines = [shown]
    else:
        shown += "; follows the writer, no lease"
        look = f"  follows:     a look every {human_seconds(float(view.get('refresh') or 0))}"
        if not view.get("refresh"):
            look = "  follows:     at `wsfs sync` only (--refresh 0)"
        if view.get("looked"):
            look += f", the last {human_seconds(now - float(view['looked']))} ago"
        look += f"; {view.get('moves', 0)} moves"
        if view.get("error"):
            look += f"; failing: {view['error']}"
        lines = [shown, look]
    if view.get("older_open"):
        lines.append(f"  open files:  some still read {view['older_open']} older checkpoints "
                     "(each until it is closed)")
    lines.append(f"  cache:       {human_bytes(st.get('cache_bytes', 0))} of "
                 f"{human_bytes(st.get('cache_limit', 0))} "
                 f"({st.get('cache_hits', 0)} hits, {st.get('cache_misses', 0)} misses)")
    return lines


def _fencing_lines(st: dict[str, Any]) -> list[str]:
    """Whether the store fences a writer that lost the workspace, whether this mount is
    fenced (and why, and what to do), and the conflict copies its start exported."""
    lines = []
    if st.get("fenced"):
        lines.append(f"  FENCED:      {st['fenced']}")
    if st.get("fencing") is False:
        lines.append("  fencing:     off: the store ignores conditional writes, so a paused "
                     "or cut-off mount elsewhere is not fenced (docs/faults.md)")
    for c in st.get("conflicts") or ():
        lines.append(f"  conflicts:   {c['files']} files the store never got from "
                     f"{c['source']} are in {c['into']}")
    return lines


def _format_dead(st: dict[str, Any]) -> str:
    """A mount whose daemon is gone: what is left of it, and how to recover."""
    mp = st["mountpoint"]
    lines = [f"{mp}: dead (its daemon, pid {st['pid']}, is gone: killed or crashed)",
             f"  store:       {st.get('store')}", f"  cache dir:   {st.get('cache_dir')}"]
    if st.get("mounted"):
        lines.append("  mount:       still there; every access fails with 'Transport "
                     "endpoint is not connected'")
    else:
        lines.append("  mount:       gone already")
    if "dirty_bytes" in st:
        lines.append(f"  unsaved:     {human_bytes(st['dirty_bytes'])} in {st['dirty_blocks']} "
                     "dirty blocks at the daemon's last report (in the cache dir)")
    lines.append(f"  recover:     `wsfs unmount {mp}` (or `fusermount3 -uz {mp}`), then mount "
                 "again with the same cache dir: the next mount uploads the unsaved data")
    return "\n".join(lines)


def dead_error(rows: list[dict[str, Any]]) -> DaemonGoneError | None:
    """The error `wsfs status` exits with when a mount's daemon is gone."""
    for st in rows:
        if st.get("state") == "dead":
            return DaemonGoneError.of(st["mountpoint"], st["pid"], st.get("cache_dir"))
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per mount: the answer to "is everything saved?" for the whole machine."""
    if not rows:
        return "no wsfs mounts on this machine"
    out = [f"{'MOUNTPOINT':<30} {'STATE':<10} {'UNSAVED':>10} {'CHECKPOINT':<16} STORE"]
    for st in rows:
        state = (st.get("state", "?") if st.get("alive") or st.get("pid")
                 else "unregistered")
        if st.get("stale"):
            state += "?"
        if st.get("fenced"):
            state = "FENCED"
        age = st.get("checkpoint_age")
        ckpt = f"#{st.get('checkpoint', '?')}" + (f" {human_seconds(age)} ago"
                                                  if age is not None else "")
        unsaved = human_bytes(st["dirty_bytes"]) if "dirty_bytes" in st else "?"
        out.append(f"{st['mountpoint']:<30} {state:<10} {unsaved:>10} {ckpt:<16} "
                   f"{st.get('store')}")
    return "\n".join(out)


def show(mountpoint: Path | None, *, as_json: bool) -> tuple[str, DaemonGoneError | None]:
    """The text `wsfs status` prints, and the error it exits with (a dead mount) if any."""
    if mountpoint is None:
        rows = [read_status(e) for e in list_mounts()]
        return (json.dumps(rows, indent=1) if as_json else format_table(rows)), dead_error(rows)
    st = read_status(registry_entry(mountpoint))
    return (json.dumps(st, indent=1) if as_json else format_status(st)), dead_error([st])


def sync(mountpoint: Path, *, progress: bool, timeout: float | None = None) -> str:
    """Publish everything written to `mountpoint` so far; return a one-line summary.

    The kernel first hands over the pages it still caches (syncfs), then the daemon is asked
    for a flush cycle that starts after the request (see wsfs.daemon.control). Raises FlushError if
    the daemon reports a failure, goes away before finishing, or the timeout passes.
    """
    import pyfuse3

    entry = registry_entry(mountpoint)
    assert entry.pid is not None and entry.cache_dir is not None
    st = read_status(entry)
    if st["state"] == "dead":
        raise DaemonGoneError.of(entry.mountpoint, entry.pid, entry.cache_dir)
    try:
        pyfuse3.syncfs(entry.mountpoint)
    except OSError as e:
        log.warning("syncfs(%s) failed: %s", entry.mountpoint, e)
    start = time.monotonic()
    uploaded_before = int(st.get("uploaded_bytes", 0))
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
                return closing(int(st.get("uploaded_bytes", 0)) - uploaded_before,
                               f"synced {entry.mountpoint}", time.monotonic() - start,
                               st.get("checkpoint"))
            if not st["alive"]:
                if st.get("state") == "done":  # unmounted meanwhile: the final flush saved all
                    return closing(int(st.get("uploaded_bytes", 0)) - uploaded_before,
                                   f"{entry.mountpoint} was unmounted meanwhile",
                                   time.monotonic() - start, st.get("checkpoint"))
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

