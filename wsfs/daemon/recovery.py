"""Picking up after an unclean stop, before the mount serves: what a crash of the daemon or
of the machine left in the cache dir is made consistent with the metadata.

Apart from serve.py because it is a job of its own, run once between opening the cache dir
and building the flusher (wiring.py), and tested alone (tests/test_layers.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from ..blocks import BlockCache, BlockCorrupt
from ..fs.base import drop_blocks
from ..meta import Metadata

log = logging.getLogger(__name__)


async def recover(meta: Metadata, blocks: BlockCache) -> None:
    """Pick up after a crash: requeue dirty blocks, drop unreferenced ones and orphan inodes.

    A block the metadata references must be either dirty here or uploaded with a checksum;
    anything else would stop every later checkpoint (the flusher refuses to publish a block
    without a checksum). Such a block is looked up (its clean copy, or its own object in
    the store) and, if found, uploaded again as a new block (the old object, if any, is left
    to `wsfs gc`); otherwise it becomes a hole, loudly: it can only be data that no fsync
    acknowledged.
    """
    requeued = 0
    dirty = set(blocks.recover(meta.awaits_upload))
    # What a daemon crash left may be in the page cache only: durable first, since the
    # files of blocks it says are uploaded (or no longer referenced) are deleted next.
    await trio.to_thread.run_sync(meta.sync, limiter=blocks.local_limiter)
    for block_id in dirty:
        if meta.awaits_upload(block_id):
            requeued += 1
            # Writable again: a copy kept by an upload whose checksum the crash lost would
            # get stale with the next write.
            blocks.clean.forget(block_id)
        else:  # uploaded just before the crash, or no longer referenced: the file may go
            blocks.retire(block_id, meta.synced_commits)
    boot = boot_id()
    if meta.get_setting("clean_unmount") != "1" and meta.get_setting("boot_id") != boot:
        # The machine went down under the last mount: the clean cache's files are written
        # without fsync, so an entry may have reached the disk before its bytes. Served as
        # they are (no checksum is checked on a hit), and copied into new blocks on a write,
        # they would turn into data (below too); the store holds every one of them.
        log.warning("the machine stopped under the last mount: emptying the clean cache")
        await trio.to_thread.run_sync(blocks.clean.clear, limiter=blocks.local_limiter)
    meta.set_setting("boot_id", boot)
    for ino, idx, block_id in meta.blocks_without_checksum():
        if block_id in dirty:
            continue
        try:
            content = await blocks.clean.download(block_id, None)
        except BlockCorrupt:
            log.error("inode %d lost block %d (%s) in a crash before it was saved: it reads "
                      "as zeros", ino, idx, block_id)
            meta.remove_block(ino, idx)
        else:  # uploaded before the crash: as an object of its own or in a pack, which
            # this does not know, so recording it as stored could name an object the store
            # lacks; uploaded again instead, as a new block
            meta.set_block(ino, idx, await blocks.create_synced(content))
    orphans = meta.orphans()
    meta.begin()
    drop_blocks(meta, blocks, meta.delete_inodes(orphans))
    meta.commit()
    meta.flush()
    if requeued or orphans:
        log.warning("recovered from an unclean stop: %d dirty blocks to upload, %d orphan "
                    "inodes removed", requeued, len(orphans))


def boot_id() -> str:
    """This boot of the machine: a mount that stopped uncleanly under another one went
    down with the machine, not just with its daemon."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
