"""The object graph of a mount, built in one place and read top to bottom.

Each layer declares what it needs of another as a small Protocol and is given it when it is
made: nothing is assigned onto an object from outside afterwards. The order below makes that
possible, since every collaborator exists before the object that needs it:

1. the block cache (blocks/), which needs nothing above it;
2. the metadata (meta/), given the block cache as its CommitHooks (meta/commits.py): a
   commit lets the files of dropped or uploaded blocks go, a rollback takes them back, a
   sync says which commits are durable;
3. recovery (recovery.py), once, on both;
4. the repacker, before the flusher counts what is published (it may record pack sizes);
5. the filesystem (fs/), whose fsync(2) under -o fsync_remote waits for a publication through
   the daemon, which exists before all of this (`publish`);
6. the flusher, given the filesystem (sync/flusher.py's Filesystem: its batched deletions go
   before each snapshot), the lease (LeaseCheck) and the daemon (Fencing).

Where a lower layer must learn something from a higher one at run time, the call goes down
instead: the flusher waits on the block cache for a full disk (`BlockCache.wait_disk_full`),
and the filesystem hands what makes the metadata durable to each `BlockCache.fsync`.

The daemon (serve.py) takes the lease and prepares the cache dir before it builds this, and
runs what it gets back; a workspace's creation (workspace.py) uses `open_cache` alone.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ..blocks import BlockCache
from ..cachedir import CacheDir
from ..config import MountConfig
from ..errors import NoWorkspaceError
from ..fs import Operations
from ..latency import Latencies
from ..meta import Metadata
from ..meta.retention import Schedule
from ..meta.schema import MARKER, ROOT
from ..runtime import mounted_read_only
from ..store import ObjectStore
from ..sync.flusher import Fencing, Flusher, LeaseCheck
from ..sync.repack import Repacker
from .recovery import recover


@dataclass(frozen=True, slots=True)
class Mount:
    """The parts of one mount, for the daemon that runs them."""

    blocks: BlockCache
    meta: Metadata
    repacker: Repacker
    ops: Operations
    flusher: Flusher


def open_cache(
    cache_dir: Path,
    store: ObjectStore,
    *,
    block_size: int,
    limiter: trio.CapacityLimiter,
    cache_size: int = 1 << 26,
    dirty_limit: int = 1 << 26,
    read_timeout: float = 60.0,
    full_timeout: float = 60.0,
) -> tuple[BlockCache, Metadata]:
    """The block cache over `cache_dir`, then the metadata, whose commits it follows."""
    blocks = BlockCache(cache_dir, store, block_size=block_size, cache_size=cache_size,
                        dirty_limit=dirty_limit, limiter=limiter, read_timeout=read_timeout,
                        full_timeout=full_timeout)
    return blocks, Metadata(CacheDir(cache_dir).meta_db, hooks=blocks)


async def build(
    cfg: MountConfig,
    cache_dir: Path,
    store: ObjectStore,
    *,
    block_size: int,
    limiter: trio.CapacityLimiter,
    lease: LeaseCheck,
    mount_id: str,
    head_etag: str | None,
    fencing: Fencing,
    publish: Callable[[], Awaitable[None]],
    writeback: Callable[[], Awaitable[None]],
    latencies: Latencies,
) -> Mount:
    """Build the mount over a prepared cache dir, recovering what an unclean stop left.

    `lease` (whose `mount_id` meta/HEAD names, with `head_etag` as the daemon claimed it) is
    checked before each publication; `fencing` is told once this mount is fenced off;
    `publish` is what an fsync(2) waits for under -o fsync_remote; `writeback` has the
    kernel hand over its dirty pages (Operations); `latencies` records every request's
    duration.
    """
    blocks, meta = open_cache(cache_dir, store, block_size=block_size, limiter=limiter,
                              cache_size=cfg.cache_size, dirty_limit=cfg.dirty_limit,
                              read_timeout=cfg.read_timeout, full_timeout=cfg.enospc_timeout)
    if not has_marker(meta):
        raise NoWorkspaceError(
            f"the workspace in {cfg.store_url} has no /.workspace.initialized marker, "
            "so it cannot be used; restore the marker or create a new workspace"
        )
    await recover(meta, blocks)
    # a read-only mount rewrites nothing in the store
    repacker = Repacker(meta, blocks, store, interval=0 if cfg.read_only else None)
    ops = Operations(meta, blocks, cache_timeout=cfg.cache_timeout, read_only=cfg.read_only,
                     remote_fsync=publish if cfg.fsync_remote else None, latencies=latencies,
                     writeback=writeback,
                     still_read_only=partial(mounted_read_only, os.path.realpath(cfg.mountpoint)))
    flusher = Flusher(meta, blocks, store, cache_dir, flush_delay=cfg.flush_delay,
                      limiter=limiter, keep=Schedule.parse(cfg.keep), filesystem=ops,
                      lease=lease, fencing=fencing, head_etag=head_etag, mount_id=mount_id)
    return Mount(blocks, meta, repacker, ops, flusher)


def has_marker(meta: Metadata) -> bool:
    """Whether the root holds a usable marker (as workspace.create makes it): a non-empty
    regular file with its data block. A mount is built over nothing else."""
    ino = meta.lookup(ROOT, MARKER)
    node = None if ino is None else meta.get_inode(ino)
    if node is None or not stat.S_ISREG(node.mode) or node.size == 0:
        return False
    return meta.get_block(node.id, 0) is not None
