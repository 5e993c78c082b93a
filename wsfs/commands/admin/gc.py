"""`wsfs gc STORE`: thin the checkpoints on the schedule, then delete the objects no kept
checkpoint references, safely beside a writer.

What is kept (never deleted):
- the checkpoints the schedule (`--keep`, the same as the mounts': meta/retention.py) and the
  named snapshots keep, and the newest; the others' manifests go first, with the same
  protocol as the daemon's thinning (meta/history.py), so a name given meanwhile is honoured;
- every data object (a block, or a pack of small blocks) any kept checkpoint references, so
  each kept checkpoint stays whole (retention.py `may_delete`, the rule the daemon's garbage
  follows too);
- every metadata page those manifests name, and their bundles;
- every object younger than `min_age` (default one hour), whatever references it;
- everything that is not a block, page, bundle or manifest (superblock, HEAD, lease, names,
  unknown keys).

Why the grace period makes gc safe while a writer is mounted: a mounted writer uploads a
cycle's blocks and pages *before* it publishes the checkpoint that references them, so for a
moment they are in the store and referenced by nothing gc can see. A cycle publishes once its
last upload is in (the flusher retries without end): within the grace period as long as that
is longer than the dirty limit (or an unmount's backlog) takes to upload, which
docs/operations.md asks of `--min-age`.
And a block a new checkpoint references is either one of those young uploads, or was already
referenced by the newest checkpoint gc read: block ids are never reused, so a block that left
the tree never comes back, and a pack only ever holds the blocks it was uploaded with, so a
pack no checkpoint references never comes back either. The same holds for pages (a manifest
reuses only pages of the previous manifest, the newest, which gc keeps). Object ages come
from the store's clock (LastModified).

Repacking (wsfs/sync/repack.py) keeps this true: it moves live blocks out of mostly dead packs
into *new* packs, uploaded (young) before the checkpoint that names them, and never points
a block at an existing pack, so a pack still only ever holds the blocks it was uploaded
with and a pack that left the checkpoints never comes back. A block may live in another
object in an older kept checkpoint than in the newest; gc keeps every object any kept
checkpoint names, so each stays whole. Repacking needs the metadata authority (the lease) and
publishes checkpoints, so gc, which runs beside a writer without a lease, never repacks; a
workspace that is not mounted does not change, and its next mount repacks it.

The one writer the grace period cannot protect is one that crashed (or failed its final
flush) after uploading blocks it never published: its cache dir still references them and
the next mount from it publishes them, however much later. Such a writer leaves its lease
behind, so gc refuses to delete data while an expired lease is in the store, unless --force.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...daemon.lease import read_holder
from ...errors import LeaseError, NoWorkspaceError, WsfsError
from ...meta import checkpoint as ckpt
from ...meta import retention
from ...meta.history import History, read_snapshots
from ...meta.retention import Schedule
from ...meta.superblock import read_superblock
from ...progress import human_bytes, human_seconds
from ...store import ObjectStore
from . import data_objects, each_database, list_detailed

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE = 3600.0
BLOCK_PREFIX = "data/"
READ_ATTEMPTS = 5


@dataclass
class GcReport:
    store: str
    dry_run: bool
    min_age: float
    keep: str = retention.DEFAULT_KEEP
    checkpoints_kept: list[int] = field(default_factory=list)
    snapshots: dict[str, int] = field(default_factory=dict)  # name -> checkpoint
    live_objects: int = 0
    objects_deleted: int = 0
    object_bytes_deleted: int = 0
    pages_deleted: int = 0
    page_bytes_deleted: int = 0
    manifests_deleted: int = 0
    young_kept: int = 0  # unreferenced, but younger than min_age: maybe a writer's upload
    young_bytes_kept: int = 0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def gc(store: ObjectStore, *, min_age: float = DEFAULT_MIN_AGE, dry_run: bool = False,
       force: bool = False, keep: Schedule | None = None, now: float | None = None
       ) -> GcReport:
    """Thin the checkpoints of the workspace in `store` on the schedule `keep` (default: the
    default schedule) as of `now`, and collect its garbage (blocking)."""
    read_superblock(store)
    holder = read_holder(store)
    if holder is not None and not force and (holder.expires < time.time()
                                             or not holder.alive_here()):
        raise LeaseError(
            f"the last mount of {store.url} did not stop cleanly ({holder.describe()}), so its "
            "cache dir may hold uploads no checkpoint references yet; mount and unmount it "
            "once to publish them, or pass --force if that cache dir is gone for good"
        )
    if getattr(store, "list_detailed", None) is None and min_age > 0:
        raise WsfsError(f"the store {store.url} cannot tell object ages, so gc cannot leave a "
                        "mounted writer's fresh uploads alone; pass --min-age 0 if no one "
                        "mounts the workspace")
    schedule = keep if keep is not None else Schedule.parse(retention.DEFAULT_KEEP)
    start = time.time()
    now = start if now is None else now
    report = GcReport(store.url, dry_run, min_age, keep=str(schedule))
    if ckpt.read_head(store) is None:
        raise NoWorkspaceError(f"{store.url} has a superblock but no checkpoint; nothing to "
                               "collect")
    for _attempt in range(READ_ATTEMPTS):
        history = History()
        history.refresh(store)
        names = read_snapshots(store)
        if dry_run:
            kept = sorted(history.keep(schedule, [n.seq for n in names.values()], now))
            report.manifests_deleted = len(history.manifests) - len(kept)
        else:
            thinned = history.thin(store, schedule, now, delete_pages=False)
            kept = thinned.kept
            report.manifests_deleted += len(thinned.deleted)
        # object -> the newest kept checkpoint that names it: its run holds a kept one
        runs: dict[str, tuple[int, int]] = {}
        live_pages: set[str] = set()
        read: set[int] = set()
        with tempfile.TemporaryDirectory(prefix="wsfs-gc-") as tmp:
            for manifest, db in each_database(store, [history.manifests[s] for s in kept],
                                              Path(tmp)):
                if db is None:
                    continue  # thinned by a mount meanwhile: it keeps nothing
                read.add(manifest.seq)
                live_pages.update(manifest.pages)
                runs.update((o, (manifest.seq, manifest.seq)) for o in data_objects(db))
        if kept and kept[-1] in read:
            break
        # a busy writer published and thinned past the newest while we read: start over
        # (the pages and blocks read so far prove nothing about the newer manifests)
    else:
        raise WsfsError(f"the checkpoints of {store.url} changed faster than gc could read "
                        "them; run gc again")
    report.checkpoints_kept = sorted(read)
    report.snapshots = {n.name: n.seq for n in names.values()}
    report.live_objects = len(runs)

    def old_enough(mtime: float | None) -> bool:
        return min_age <= 0 or (mtime is not None and start - mtime >= min_age)

    def sweep(prefix: str, live: Callable[[str], bool]) -> tuple[list[str], int]:
        """The keys under `prefix` that are neither `live` (given the rest of the key) nor
        young, and their total size; the young are counted in the report."""
        doomed, doomed_bytes = [], 0
        for key, size, mtime in list_detailed(store, prefix):
            if live(key[len(prefix):]):
                continue
            if not old_enough(mtime):
                report.young_kept += 1
                report.young_bytes_kept += size
                continue
            doomed.append(key)
            doomed_bytes += size
        return doomed, doomed_bytes

    def object_stays(rest: str) -> bool:
        object_id = rest.rsplit("/", 1)[-1]
        return not retention.may_delete(*runs.get(object_id, retention.UNNAMED), kept)

    doomed_objects, report.object_bytes_deleted = sweep(BLOCK_PREFIX, object_stays)
    doomed_pages, page_bytes = sweep(ckpt.PAGE_PREFIX, live_pages.__contains__)
    # A bundle goes with its manifest; one whose manifest never came (its writer crashed
    # between the two uploads) is deleted once it is old enough.
    doomed_bundles, bundle_bytes = sweep(
        ckpt.BUNDLE_PREFIX, lambda name: name.isdigit() and int(name) in read)
    report.objects_deleted = len(doomed_objects)
    report.pages_deleted = len(doomed_pages) + len(doomed_bundles)
    report.page_bytes_deleted = page_bytes + bundle_bytes
    if not dry_run:
        # (the thinned manifests went first: a page is only ever deleted once no kept
        # manifest names it)
        store.delete_many(doomed_bundles)
        store.delete_many(doomed_pages)
        store.delete_many(doomed_objects)
    log.info("gc store=%s dry_run=%s objects_deleted=%d pages_deleted=%d manifests_deleted=%d "
             "young_kept=%d", store.url, dry_run, report.objects_deleted, report.pages_deleted,
             report.manifests_deleted, report.young_kept)
    return report


def format_report(r: GcReport) -> str:
    verb = "would delete" if r.dry_run else "deleted"
    kept = retention.span(dict.fromkeys(r.checkpoints_kept, 0.0)) if r.checkpoints_kept else "none"
    named = ", ".join(f"{n} (#{s})" for n, s in sorted(r.snapshots.items()))
    lines = [
        f"{r.store}: {verb} {r.objects_deleted} unreferenced data objects "
        f"({human_bytes(r.object_bytes_deleted)}), {r.pages_deleted} metadata pages "
        f"({human_bytes(r.page_bytes_deleted)}) and {r.manifests_deleted} checkpoints the "
        f"schedule ({r.keep}) lets go",
        f"  kept checkpoints {kept} and the {r.live_objects} data objects (blocks and "
        "packs) they reference" + (f"; named snapshots: {named}" if named else ""),
    ]
    if r.young_kept:
        lines.append(f"  kept {r.young_kept} unreferenced objects "
                     f"({human_bytes(r.young_bytes_kept)}) younger than "
                     f"{human_seconds(r.min_age)}: a mounted writer may be about to publish them")
    return "\n".join(lines)
