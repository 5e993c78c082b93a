"""The checkpoints a store keeps, the names that pin some of them, and thinning them.

Retention (meta/retention.py) decides; this module reads and changes the store accordingly,
for the running daemon (sync/retain.py) and for `wsfs gc` and `wsfs snapshot` alike. Every
function blocks: the daemon calls them in a worker thread.

A named snapshot is one small object, `meta/snapshots/<name>.json` ({"seq": N, ...}): a name
is created with a conditional write (two machines creating the same name: one wins, the
other is told), deleted with one DELETE, and listed with the manifests by anyone who can
read the store; no database is involved, so it works on a workspace mounted elsewhere or not
at all, without the lease.

**Thinning** (`History.thin`) runs beside `wsfs snapshot create` on another machine:
1. read the names; keep the schedule's checkpoints and the named ones (`retention.kept`);
2. delete the manifests of the others (with their bundles);
3. read the names again: a checkpoint named meanwhile gets its manifest back (we hold it) and
   is kept;
4. only then delete the pages that only the deleted manifests named.
`create_snapshot` writes the name first and reads the manifest after: if the manifest is gone,
a thinning pass deleted it in step 2 and read the names in step 3 before the new name showed,
so it may delete the checkpoint's objects: the name is taken back and the command fails. If the
manifest is there, any pass that deleted it reads the name in its step 3 and puts it back before
anything the checkpoint needs is deleted. Data objects go only later, once a pass has left a
checkpoint out for good (sync/retain.py, commands/admin/gc.py). Should the store fail
between steps 2 and 3, step 3 is retried; a pass that gives up keeps the manifests it
deleted, and the daemon's next pass puts back any that a name keeps by then (a `wsfs gc` that
gives up exits with the store's error: a name given in that moment may lack its checkpoint,
which `wsfs fsck` reports).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

from ..store import NoSuchKey, ObjectStore
from . import checkpoint as ckpt
from . import retention
from .retention import Schedule

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "meta/snapshots/"
THREADS = 16  # parallel GETs of manifests and names

T = TypeVar("T")
R = TypeVar("R")


def _parallel(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _retried(fn: Callable[[], R], attempts: int = 5) -> R:
    """`fn()`, tried again after a short pause if the store fails: between deleting
    manifests and reading the names again, giving up leaves a name given meanwhile without
    its checkpoint (the daemon settles it at its next pass; `wsfs gc` cannot)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


# -- named snapshots ----------------------------------------------------------------------

def snapshot_key(name: str) -> str:
    return f"{SNAPSHOT_PREFIX}{name}.json"


@dataclass(frozen=True, slots=True)
class Snapshot:
    name: str
    seq: int
    created_ns: int  # when the name was given


def read_snapshots(store: ObjectStore) -> dict[str, Snapshot]:
    """Every named snapshot in the store, by name (a name deleted while read is left out)."""
    names = [key[len(SNAPSHOT_PREFIX):-len(".json")] for key, _ in store.list(SNAPSHOT_PREFIX)
             if key.endswith(".json")]

    def get(name: str) -> Snapshot | None:
        try:
            d = json.loads(store.get(snapshot_key(name)))
        except NoSuchKey:
            return None
        return Snapshot(name, int(d["seq"]), int(d.get("created_ns", 0)))

    return {s.name: s for s in _parallel(get, names) if s is not None}


def create_snapshot(store: ObjectStore, name: str, seq: int) -> Snapshot | None:
    """Pin checkpoint `seq` under `name`; None if the name exists. Raises NoSuchKey (and
    takes the name back) if the checkpoint's manifest is gone once the name is written: a
    thinning pass deleted it meanwhile (see the module docstring)."""
    snap = Snapshot(retention.check_name(name), seq, time.time_ns())
    body = json.dumps({"name": name, "seq": seq, "created_ns": snap.created_ns}).encode()
    if not store.put_if_absent(snapshot_key(name), body):
        return None
    if store.head(ckpt.manifest_key(seq)) is None:
        store.delete(snapshot_key(name))
        raise NoSuchKey(ckpt.manifest_key(seq))
    return snap


def delete_snapshot(store: ObjectStore, name: str) -> bool:
    """Take a name away (its checkpoint is thinned as the schedule says); False if there
    was no such name."""
    key = snapshot_key(name)
    if store.head(key) is None:
        return False
    store.delete(key)
    return True


# -- the kept checkpoints -----------------------------------------------------------------

def manifest_seqs(store: ObjectStore) -> list[int]:
    """Sequence numbers of the checkpoints whose manifests are in the store, oldest first."""
    seqs = []
    for key, _ in store.list(ckpt.MANIFEST_PREFIX):
        name = key[len(ckpt.MANIFEST_PREFIX):]
        if name.endswith(".json") and name[:-5].isdigit():
            seqs.append(int(name[:-5]))
    return sorted(seqs)


def _interned(manifest: ckpt.Manifest) -> ckpt.Manifest:
    """The manifest with its page digests shared with the other manifests held: a daemon
    holds every kept one (hundreds), and neighbours name mostly the same pages (each digest
    once, not once per manifest: 250 checkpoints of 550 pages, 30 new in each, held 16.7 MB,
    2.0 MB interned)."""
    return replace(manifest, pages=tuple(sys.intern(d) for d in manifest.pages))


@dataclass
class Thinned:
    """What one thinning pass did."""

    kept: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)  # manifests
    pages_deleted: int = 0
    restored: list[int] = field(default_factory=list)  # named while the pass ran


class History:
    """The checkpoints the store holds, as far as this process knows: their manifests, read
    once each (a manifest never changes). A superset of the truth is safe (it keeps more);
    so the daemon lists the store once and then adds what it publishes itself."""

    def __init__(self) -> None:
        self.manifests: dict[int, ckpt.Manifest] = {}
        self.listed = False
        # Manifests a pass deleted without reading the names again after (the store failed
        # in between): a name given meanwhile may want one back (`thin`).
        self._unsettled: set[int] = set()

    def refresh(self, store: ObjectStore) -> None:
        """List the manifests in the store and read those not known yet."""
        seqs = manifest_seqs(store)

        def get(seq: int) -> ckpt.Manifest | None:
            try:
                return ckpt.read_manifest(store, seq)
            except NoSuchKey:  # thinned meanwhile
                return None

        found = {s: self.manifests[s] for s in seqs if s in self.manifests}
        for m in _parallel(get, [s for s in seqs if s not in found]):
            if m is not None:
                found[m.seq] = _interned(m)
        self.manifests = found
        self.listed = True

    def add(self, manifest: ckpt.Manifest) -> None:
        """A checkpoint this process published."""
        self.manifests[manifest.seq] = _interned(manifest)

    def times(self) -> dict[int, float]:
        """Checkpoint number -> creation time (seconds since the epoch)."""
        return {s: m.created_ns / 1e9 for s, m in self.manifests.items()}

    def kept(self) -> list[int]:
        """The checkpoints that may be in the store, ascending: what `retention.may_delete`
        is asked about."""
        return sorted(self.manifests)

    def keep(self, schedule: Schedule, pinned: Iterable[int], now: float) -> set[int]:
        """The known checkpoints to keep (`retention.kept`; those an older version published
        are kept only if newest or named: they may lack objects)."""
        partial = [s for s, m in self.manifests.items() if not m.whole]
        return retention.kept(self.times(), pinned, now, schedule, partial=partial)

    def thinnable(self, schedule: Schedule, now: float) -> bool:
        """Whether the schedule alone would let a known checkpoint go (names only keep
        more): no pass, and no request to the store, is needed otherwise."""
        return len(self.keep(schedule, (), now)) < len(self.manifests)

    def thin(self, store: ObjectStore, schedule: Schedule, now: float, *,
             delete_pages: bool = True) -> Thinned:
        """Delete the checkpoints neither the schedule nor a name keeps (blocking; see the
        module docstring for the order). Pages only they named go too with `delete_pages`
        (`wsfs gc` leaves them to its own sweep, which spares young ones: a writer beside it
        may be uploading one again)."""
        if not self.listed:
            self.refresh(store)
        out = Thinned()
        names = read_snapshots(store)
        keep = self.keep(schedule, [s.seq for s in names.values()], now)
        for seq in sorted(self._unsettled & keep):  # named since an unfinished pass
            store.put(ckpt.manifest_key(seq), self.manifests[seq].encode())
            out.restored.append(seq)
        self._unsettled -= keep
        victims = sorted(set(self.manifests) - keep)
        if victims:
            self._unsettled.update(victims)
            store.delete_many([ckpt.manifest_key(s) for s in victims])
            again = {s.seq for s in _retried(lambda: read_snapshots(store)).values()}
            for seq in sorted(again & set(victims)):
                _retried(partial(store.put, ckpt.manifest_key(seq),
                                 self.manifests[seq].encode()))
                out.restored.append(seq)
                victims.remove(seq)
            self._unsettled.clear()
            gone = [self.manifests.pop(s) for s in victims]
            bundles = [ckpt.bundle_key(m.seq) for m in gone if m.bundle is not None]
            pages: list[str] = []
            if delete_pages:
                live = {d for m in self.manifests.values() for d in m.pages}
                pages = [ckpt.page_key(d) for d in {d for m in gone for d in m.pages} - live]
            store.delete_many(bundles + pages)
            out.deleted, out.pages_deleted = victims, len(pages)
            if victims:
                log.info("thinned %d checkpoints (%s), %d pages", len(victims),
                         retention.span({s: 0.0 for s in victims}), len(pages))
        out.kept = sorted(self.manifests)
        return out
