"""What the kept checkpoints hold in the store: for each, its files and the bytes only it
names; for all, what the older ones hold beyond the newest.

One pass over every kept checkpoint (`each_database`: each fetched once, neighbours share
most pages, so a month of checkpoints costs about the pages that changed in it) and one
listing of the store's data objects and metadata pages. "Only it holds" is what deleting that
one checkpoint (thinning it, or deleting the snapshot that pins it) would free: the data
objects and metadata pages no other kept checkpoint names. Used by `wsfs snapshot list` and
`wsfs du`.
"""

from __future__ import annotations

import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ...blocks import object_key
from ...meta import checkpoint as ckpt
from ...meta.history import History, Snapshot
from ...store import ObjectStore
from . import data_objects, each_database, list_detailed


@dataclass
class Held:
    """One kept checkpoint."""

    seq: int
    created: float  # seconds since the epoch
    names: list[str] = field(default_factory=list)  # the snapshots that pin it
    files: int = 0  # regular files (hard links once)
    objects: int = 0  # data objects it names
    bytes: int = 0  # their stored size
    only_objects: int = 0  # data objects and pages no other kept checkpoint names
    only_bytes: int = 0
    missing: int = 0  # data objects it names that the store lacks
    lost: bool = False  # thinned while it was read


@dataclass
class Holdings:
    checkpoints: list[Held] = field(default_factory=list)  # oldest first
    older_objects: int = 0  # data objects only checkpoints older than the newest name
    older_bytes: int = 0
    unreferenced_objects: int = 0  # data objects no kept checkpoint names (gc's)
    unreferenced_bytes: int = 0
    seconds: float = 0.0  # what it took


def _count_files(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM inodes WHERE (mode & ?) = ?",
                                (0o170000, stat.S_IFREG)).fetchone()[0])
    finally:
        conn.close()


def holdings(store: ObjectStore, history: History, names: Iterable[Snapshot],
             sizes: dict[str, int] | None = None) -> Holdings:
    """Measure the checkpoints `history` knows (blocking). `sizes`: key -> size of every
    object under data/ and meta/pages/, if the caller listed them already."""
    start = time.monotonic()
    if sizes is None:
        sizes = {k: s for prefix in ("data/", ckpt.PAGE_PREFIX)
                 for k, s, _ in list_detailed(store, prefix)}
    out = Holdings()
    held = {m.seq: Held(m.seq, m.created_ns / 1e9) for m in history.manifests.values()}
    for snap in sorted(names, key=lambda n: n.name):
        if snap.seq in held:
            held[snap.seq].names.append(snap.name)
    # key -> (how many kept checkpoints name it, the last of them)
    named: dict[str, tuple[int, int]] = {}
    newest = max(held) if held else 0
    with tempfile.TemporaryDirectory(prefix="wsfs-holdings-") as tmp:
        for manifest, db in each_database(store, list(history.manifests.values()), Path(tmp)):
            h = held[manifest.seq]
            if db is None:
                h.lost = True
                continue
            h.files = _count_files(db)
            keys = {object_key(o) for o in data_objects(db)}
            keys |= {ckpt.page_key(d) for d in set(manifest.pages)}
            for key in keys:
                count, _last = named.get(key, (0, 0))
                named[key] = (count + 1, manifest.seq)
                if key.startswith("data/"):
                    h.objects += 1
                    if key in sizes:
                        h.bytes += sizes[key]
                    else:
                        h.missing += 1
    for key, (count, last) in named.items():
        size = sizes.get(key, 0)
        if count == 1:
            held[last].only_objects += 1
            held[last].only_bytes += size
        if last != newest and key.startswith("data/"):
            out.older_objects += 1
            out.older_bytes += size
    for key, size in sizes.items():
        if key.startswith("data/") and key not in named:
            out.unreferenced_objects += 1
            out.unreferenced_bytes += size
    out.checkpoints = [held[s] for s in sorted(held) if not held[s].lost]
    out.seconds = time.monotonic() - start
    return out
