"""`wsfs destroy STORE`: delete a workspace and every object it owns.

Only wsfs's own keys are deleted (`data/`, `meta/`, `lease`, `wsfs.json`), never other objects
under the same prefix, so a workspace at `s3://b/` cannot take the workspaces at `s3://b/x/`
with it. A live lease (the workspace is mounted) refuses the destroy; `--force` ignores it, for
a holder known to be gone (a mount that really is alive would go on writing objects into the
destroyed prefix). The destroy takes the lease itself, so no mount can start meanwhile, deletes
HEAD first (the workspace stops being mountable at once), then everything else, then the
superblock and the lease last: an interrupted destroy leaves a workspace that `wsfs ls` still
shows and that `wsfs destroy` finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ...daemon.lease import LEASE_KEY, Lease, read_holder
from ...errors import LeaseError
from ...meta import checkpoint as ckpt
from ...meta.superblock import SUPERBLOCK_KEY, read_superblock
from ...store import ObjectStore

log = logging.getLogger(__name__)

BATCH = 1000
OWN_PREFIXES = ("data/", "meta/")


@dataclass
class DestroyReport:
    store: str
    workspace_id: str
    objects: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Aborted(Exception):
    """The user did not confirm."""


def destroy(store: ObjectStore, *, confirm: Callable[[str], bool],
            force: bool = False) -> DestroyReport:
    """Delete the workspace in `store` once `confirm(workspace_id)` says yes (blocking)."""
    sb = read_superblock(store)
    holder = read_holder(store)
    if holder is not None and holder.expires > time.time() and holder.alive_here() \
            and not force:
        raise LeaseError(f"{store.url} is mounted ({holder.describe()}); unmount it first, "
                         "or pass --force if that mount is gone for good")
    if not confirm(sb.workspace_id):
        raise Aborted(sb.workspace_id)
    lease = Lease(store, "wsfs destroy")
    # Not forced unless asked: a mount may have started while the user typed the id.
    # From here on no mount can start.
    lease.acquire(force=force)
    report = DestroyReport(store.url, sb.workspace_id)
    renewed = time.monotonic()
    store.delete(ckpt.HEAD_KEY)
    for prefix in OWN_PREFIXES:
        while True:
            batch = []
            for key, size in store.list(prefix):
                batch.append(key)
                report.bytes += size
                if len(batch) >= BATCH:
                    break
            if not batch:
                break
            store.delete_many(batch)
            report.objects += len(batch)
            if time.monotonic() - renewed > lease.ttl / 3:
                lease.renew()
                renewed = time.monotonic()
    size = store.head(SUPERBLOCK_KEY) or 0
    store.delete(SUPERBLOCK_KEY)
    report.objects += 2  # the superblock and HEAD
    report.bytes += size
    store.delete(LEASE_KEY)
    log.info("destroyed workspace=%s store=%s objects=%d bytes=%d", sb.workspace_id,
             store.url, report.objects, report.bytes)
    return report
