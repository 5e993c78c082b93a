"""`wsfs du STORE`: what a workspace holds and what it costs in the store.

Logical sizes come from the newest checkpoint (fetched into a temporary directory, no mount
needed); stored sizes from one listing of the store. The largest directories include hidden
ones: caches such as `.cache/pip` or `.conda/pkgs` often take most of a workspace.

What the other kept checkpoints hold (the schedule's and the named snapshots', see
commands/admin/holdings.py): the data objects only older checkpoints name, the bytes each
named snapshot alone holds, and what no kept checkpoint names (what `wsfs gc` reclaims). That
part reads every kept checkpoint once; `newest_only` skips it.

The dead bytes inside live packs (members whose files were deleted or rewritten, kept by the
pack's survivors) are what the store bills beyond the live data until the mounted daemon
repacks them (wsfs/sync/repack.py): each referenced pack's stored size less its live members'
bytes (estimated from their files' sizes, as the repacker does; the pack's header counts as
dead).
"""

from __future__ import annotations

import sqlite3
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...blocks import object_key
from ...errors import NoWorkspaceError
from ...meta import checkpoint as ckpt
from ...meta.history import History, read_snapshots
from ...meta.packs import pack_usage
from ...meta.superblock import read_superblock
from ...progress import human_bytes, human_seconds
from ...store import ObjectStore
from . import data_objects, fetch_databases, list_detailed
from .holdings import holdings

ROOT = 1


@dataclass
class DirUsage:
    path: str
    bytes: int
    files: int


@dataclass
class DuReport:
    store: str
    workspace_id: str
    checkpoint: int
    checkpoint_time: float
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    logical_bytes: int = 0  # apparent size of every regular file, hard links counted once
    referenced_objects: int = 0
    referenced_bytes: int = 0  # stored size of the objects the checkpoint references
    missing_objects: int = 0  # referenced but not in the store: a damaged workspace
    stored_bytes: int = 0  # everything under the store's prefix
    objects: int = 0
    areas: dict[str, dict[str, int]] = field(default_factory=dict)  # data/meta/other
    # not referenced by the newest: what `wsfs gc` could reclaim (subject to its grace period)
    # and, unless newest_only, what the older kept checkpoints hold
    unreferenced_objects: int = 0
    unreferenced_bytes: int = 0
    kept_checkpoints: int = 0
    snapshots: dict[str, int] = field(default_factory=dict)  # name -> checkpoint
    older_objects: int = 0  # data objects only older kept checkpoints name
    older_bytes: int = 0
    snapshot_only_bytes: dict[str, int] = field(default_factory=dict)  # name -> only it holds
    history_seconds: float = 0.0  # the time it took to read the kept checkpoints
    pack_objects: int = 0  # referenced packs
    pack_bytes: int = 0  # their stored size
    pack_live_bytes: int = 0  # the bytes of their live members
    pack_dead_bytes: int = 0  # the rest: what repacking reclaims
    largest: list[DirUsage] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def du(store: ObjectStore, *, top: int = 15, newest_only: bool = False) -> DuReport:
    """Measure the workspace in `store` (blocking; fetches the newest checkpoint, and unless
    `newest_only` every kept one).

    Measured again if a mount published a newer checkpoint meanwhile and objects the measured
    one named are gone (deleted as garbage after it): those are not missing.
    """
    for _ in range(ckpt.RECHECKS):
        report, sizes = _du(store, top)
        if not report.missing_objects or ckpt.read_head(store) == report.checkpoint:
            break
    if not newest_only:
        _history(store, report, sizes)
    return report


def _history(store: ObjectStore, report: DuReport, sizes: dict[str, int]) -> None:
    """What the kept checkpoints other than the newest hold (see holdings.py)."""
    history = History()
    history.refresh(store)
    names = read_snapshots(store)
    held = holdings(store, history, names.values(), sizes)
    report.kept_checkpoints = len(held.checkpoints)
    report.snapshots = {n.name: n.seq for n in names.values()}
    report.older_objects, report.older_bytes = held.older_objects, held.older_bytes
    report.unreferenced_objects = held.unreferenced_objects
    report.unreferenced_bytes = held.unreferenced_bytes
    for h in held.checkpoints:
        for name in h.names:
            report.snapshot_only_bytes[name] = h.only_bytes
    report.history_seconds = held.seconds


def _du(store: ObjectStore, top: int) -> tuple[DuReport, dict[str, int]]:
    sb = read_superblock(store)
    head = ckpt.read_head(store)
    if head is None:
        raise NoWorkspaceError(f"{store.url} has a superblock but no checkpoint; its creation "
                               "was interrupted, so there is nothing to measure")
    with tempfile.TemporaryDirectory(prefix="wsfs-du-") as tmp:
        fetched = fetch_databases(store, [head], Path(tmp))
        if head not in fetched:
            raise NoWorkspaceError(f"the newest checkpoint of {store.url} disappeared while it "
                                   "was read; run the command again")
        manifest, db = fetched[head]
        report = DuReport(store.url, sb.workspace_id, head, manifest.created_ns / 1e9)
        live = data_objects(db)
        _measure_tree(db, report, top)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            pack_live = {u.id: u.live for u in pack_usage(conn, sb.block_size)}
        finally:
            conn.close()
    sizes: dict[str, int] = {}
    listed: dict[str, int] = {}  # data objects and metadata pages, for holdings.py
    for key, size, _ in list_detailed(store):
        report.objects += 1
        report.stored_bytes += size
        area = key.split("/", 1)[0] if key.startswith(("data/", "meta/")) else "other"
        a = report.areas.setdefault(area, {"objects": 0, "bytes": 0})
        a["objects"] += 1
        a["bytes"] += size
        if area == "data":
            sizes[key] = size
        if area == "data" or key.startswith(ckpt.PAGE_PREFIX):
            listed[key] = size
    report.referenced_objects = len(live)
    for object_id in live:
        key = object_key(object_id)
        if key in sizes:
            size = sizes.pop(key)
            report.referenced_bytes += size
            if object_id in pack_live:
                report.pack_objects += 1
                report.pack_bytes += size
                report.pack_live_bytes += pack_live[object_id]
                report.pack_dead_bytes += max(0, size - pack_live[object_id])
        else:
            report.missing_objects += 1
    report.unreferenced_objects = len(sizes)
    report.unreferenced_bytes = sum(sizes.values())
    return report, listed


def _measure_tree(db: Path, report: DuReport, top: int) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        modes = {}
        sizes = {}
        for ino, mode, size in conn.execute("SELECT id, mode, size FROM inodes"):
            modes[ino] = mode
            sizes[ino] = size
        children: dict[int, list[tuple[bytes, int]]] = {}
        for parent, name, ino in conn.execute("SELECT parent, name, inode FROM dentries"):
            children.setdefault(parent, []).append((bytes(name), ino))
    finally:
        conn.close()
    counted: set[int] = set()
    totals: dict[int, tuple[int, int]] = {}  # dir inode -> (bytes, files)
    paths: dict[int, str] = {ROOT: "/"}
    # iterative post-order walk: directories are visited after all their children
    order: list[int] = []
    stack = [ROOT]
    seen_dirs = {ROOT}
    while stack:
        d = stack.pop()
        order.append(d)
        for name, ino in children.get(d, []):
            mode = modes.get(ino, 0)
            if stat.S_ISDIR(mode) and ino not in seen_dirs:
                seen_dirs.add(ino)
                base = paths[d].rstrip("/")
                paths[ino] = f"{base}/{name.decode(errors='backslashreplace')}"
                stack.append(ino)
    for d in reversed(order):
        total, files = 0, 0
        for _name, ino in children.get(d, []):
            mode = modes.get(ino, 0)
            if stat.S_ISDIR(mode):
                sub = totals.get(ino, (0, 0))
                total, files = total + sub[0], files + sub[1]
            elif ino not in counted:
                counted.add(ino)
                if stat.S_ISREG(mode):
                    total += sizes[ino]
                    files += 1
                    report.files += 1
                    report.logical_bytes += sizes[ino]
                elif stat.S_ISLNK(mode):
                    report.symlinks += 1
        totals[d] = (total, files)
    report.directories = len(seen_dirs)
    ranked = sorted((t[0], t[1], paths[d]) for d, t in totals.items() if d != ROOT)
    report.largest = [DirUsage(p, b, f) for b, f, p in sorted(ranked, key=lambda r: -r[0])[:top]]


def format_report(r: DuReport) -> str:
    """A person's view of `wsfs du`."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.checkpoint_time))
    lines = [
        f"workspace {r.workspace_id} in {r.store}",
        f"  checkpoint #{r.checkpoint}, published {when} "
        f"({human_seconds(time.time() - r.checkpoint_time)} ago)",
        f"  logical size: {human_bytes(r.logical_bytes)} in {r.files} files, {r.directories} "
        f"directories, {r.symlinks} symlinks",
        f"  stored size:  {human_bytes(r.stored_bytes)} in {r.objects} objects",
    ]
    for area in sorted(r.areas):
        a = r.areas[area]
        label = area if area == "other" else area + "/"
        lines.append(f"    {label:<7} {human_bytes(a['bytes']):>10} in {a['objects']} objects")
    lines.append(f"  data referenced by the checkpoint: {human_bytes(r.referenced_bytes)} in "
                 f"{r.referenced_objects} objects (blocks and packs)")
    if r.pack_dead_bytes:
        share = r.pack_dead_bytes / max(r.referenced_bytes, 1)
        lines.append(f"  dead inside packs: {human_bytes(r.pack_dead_bytes)} of the "
                     f"{human_bytes(r.pack_bytes)} in {r.pack_objects} packs ({share:.0%} of the "
                     "referenced data; a mounted daemon repacks them)")
    if r.kept_checkpoints:
        named = "".join(f"\n    snapshot {n} (#{r.snapshots[n]}) alone holds "
                        f"{human_bytes(r.snapshot_only_bytes.get(n, 0))}"
                        for n in sorted(r.snapshots))
        lines.append(f"  kept checkpoints: {r.kept_checkpoints} ({len(r.snapshots)} named); "
                     f"the older ones alone hold {human_bytes(r.older_bytes)} in "
                     f"{r.older_objects} objects (read in {r.history_seconds:.1f}s)" + named)
    if r.unreferenced_objects:
        what = "no kept checkpoint references" if r.kept_checkpoints else "not referenced"
        lines.append(f"  {what} (see `wsfs gc`): {human_bytes(r.unreferenced_bytes)} in "
                     f"{r.unreferenced_objects} objects")
    if r.missing_objects:
        lines.append(f"  MISSING from the store: {r.missing_objects} referenced objects")
    if r.largest:
        lines.append("  largest directories:")
        for d in r.largest:
            lines.append(f"    {human_bytes(d.bytes):>10} {d.files:>8} files  {d.path}")
    return "\n".join(lines)

