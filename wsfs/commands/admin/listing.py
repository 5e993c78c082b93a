"""`wsfs ls s3://BUCKET[/PREFIX]`: every workspace under a prefix, its size and last use.

One listing of the prefix finds the superblocks (`…/wsfs.json`); each workspace is the set of
objects under its superblock's directory. "Last used" is the newest of its manifest objects
(a checkpoint is published at least at every unmount) and its lease object (renewed every
20 s while mounted); a lease that has not expired means the workspace is mounted now.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from ...daemon.lease import LEASE_KEY, Holder
from ...meta import checkpoint as ckpt
from ...meta.superblock import SUPERBLOCK_KEY
from ...progress import human_bytes, human_seconds
from ...store import NoSuchKey, ObjectStore
from . import list_detailed


@dataclass
class WorkspaceInfo:
    prefix: str  # where the workspace lives, relative to the listed location ('' = there)
    url: str
    workspace_id: str | None
    created: float | None
    bytes: int = 0
    objects: int = 0
    last_used: float | None = None
    mounted_by: str | None = None  # "host pid" while a live lease names a holder
    stale_lease: bool = False  # a lease that expired: the last mount did not stop cleanly


def list_workspaces(store: ObjectStore) -> list[WorkspaceInfo]:
    """Every workspace at or under the store's prefix (blocking: one full listing)."""
    objects = list(list_detailed(store))
    roots = sorted({key[: -len(SUPERBLOCK_KEY)] for key, _, _ in objects
                    if key == SUPERBLOCK_KEY or key.endswith("/" + SUPERBLOCK_KEY)},
                   key=len, reverse=True)  # the deepest root claims its objects first
    infos = {root: WorkspaceInfo(root, _join(store.url, root), None, None) for root in roots}
    for key, size, mtime in objects:
        root = next((r for r in roots if key.startswith(r)), None)
        if root is None:
            continue
        info = infos[root]
        info.bytes += size
        info.objects += 1
        rel = key[len(root):]
        if mtime is not None and (rel.startswith(ckpt.MANIFEST_PREFIX) or rel == LEASE_KEY):
            info.last_used = max(info.last_used or 0.0, mtime)
    now = time.time()
    for root, info in infos.items():
        try:
            sb = json.loads(store.get(root + SUPERBLOCK_KEY))
            info.workspace_id = str(sb.get("workspace_id"))
            info.created = int(sb["created_ns"]) / 1e9
        except (NoSuchKey, ValueError, KeyError, TypeError):
            pass
        try:
            holder = Holder(**json.loads(store.get(root + LEASE_KEY)))
        except (NoSuchKey, ValueError, TypeError):
            continue
        if holder.expires > now and holder.alive_here():
            info.mounted_by = f"{holder.host} pid {holder.pid}"
        else:
            info.stale_lease = True
    return sorted(infos.values(), key=lambda i: i.prefix)


def _join(url: str, root: str) -> str:
    return url.rstrip("/") + ("/" + root.rstrip("/") if root else "")


def format_table(infos: list[WorkspaceInfo]) -> str:
    if not infos:
        return "no workspaces here"
    out = [f"{'WORKSPACE':<40} {'SIZE':>10} {'OBJECTS':>8} {'LAST USED':<12} {'STATE':<22} ID"]
    now = time.time()
    for i in infos:
        used = f"{human_seconds(now - i.last_used)} ago" if i.last_used else "-"
        state = (f"mounted ({i.mounted_by})" if i.mounted_by
                 else "unclean stop" if i.stale_lease else "idle")
        out.append(f"{i.url:<40} {human_bytes(i.bytes):>10} {i.objects:>8} {used:<12} "
                   f"{state:<22} {i.workspace_id}")
    return "\n".join(out)


def to_json(infos: list[WorkspaceInfo]) -> list[dict[str, object]]:
    return [asdict(i) for i in infos]
