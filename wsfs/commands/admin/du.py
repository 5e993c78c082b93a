"""`wsfs du STORE`: what a workspace holds and what it costs in the store.

Logical sizes come from the newest checkpoint (fetched into a temporary directory, no mount
needed); stored sizes from one listing of the store. The largest directories include hidden
ones: caches such as `.cache/pip` or `.conda/pkgs` often take most of a workspace.

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
from ...meta.packs import pack_usage
from ...meta.superblock import read_superblock
from ...progress import human_bytes, human_seconds
from ...store import ObjectStore
from . import data_objects, fetch_databases, list_detailed

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
    unreferenced_objects: int = 0  # what `wsfs gc` could reclaim (subject to its grace period)
    unreferenced_bytes: int = 0
    pack_objects: int = 0  # referenced packs
    pack_bytes: int = 0  # their stored size
    pack_live_bytes: int = 0  # the bytes of their live members
    pack_dead_bytes: int = 0  # the rest: what repacking reclaims
    largest: list[DirUsage] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def du(store: ObjectStore, *, top: int = 15) -> DuReport:
    """Measure the workspace in `store` (blocking; fetches the newest checkpoint).

    Measured again if a mount published a newer checkpoint meanwhile and objects the measured
    one named are gone (deleted as garbage after it): those are not missing.
    """
    for _ in range(ckpt.RECHECKS):
        report = _du(store, top)
        if not report.missing_objects or ckpt.read_head(store) == report.checkpoint:
            break
    return report


def _du(store: ObjectStore, top: int) -> DuReport:
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
    for key, size, _ in list_detailed(store):
        report.objects += 1
        report.stored_bytes += size
        area = key.split("/", 1)[0] if key.startswith(("data/", "meta/")) else "other"
        a = report.areas.setdefault(area, {"objects": 0, "bytes": 0})
        a["objects"] += 1
        a["bytes"] += size
        if area == "data":
            sizes[key] = size
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
    return report


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
    if r.unreferenced_objects:
        lines.append(f"  not referenced (see `wsfs gc`): {human_bytes(r.unreferenced_bytes)} in "
                     f"{r.unreferenced_objects} objects")
    if r.missing_objects:
        lines.append(f"  MISSING from the store: {r.missing_objects} referenced objects")
    if r.largest:
        lines.append("  largest directories:")
        for d in r.largest:
            lines.append(f"    {human_bytes(d.bytes):>10} {d.files:>8} files  {d.path}")
    return "\n".join(lines)

