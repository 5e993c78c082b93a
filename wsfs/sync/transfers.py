"""The flusher's transfers to the store: uploads of sealed blocks, one as its own object or
several as a pack, each recorded in the metadata once it is in; deletes of garbage; and the
retries, with backoff, of every store call a cycle makes.

Half of `Flusher` (flusher.py), which inherits it and keeps the order of a cycle: what may go
to the store when is decided there, how it gets there (and how often it is tried) here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ..backoff import Backoff
from ..blocks import BlockCache, object_key
from ..meta import Metadata
from ..store import ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class Transfers:
    """Uploads, garbage deletes and retries (see the module docstring)."""

    # Flusher's (flusher.py): the layers, the store and its threads, and the figures
    # (for status and tests) that the transfers keep.
    meta: Metadata
    blocks: BlockCache
    store: ObjectStore
    limiter: trio.CapacityLimiter
    uploaded_blocks: int
    uploaded_bytes: int
    uploading_blocks: int  # the upload queue: sealed blocks not yet in the store
    uploading_bytes: int
    retries: int
    last_error: str | None

    def _own(self, write: Callable[..., None], *args: object) -> None:
        raise NotImplementedError  # Flusher's: a bookkeeping change, not unpublished work

    async def _put_single(self, block_ids: list[str]) -> tuple[str | None, dict[str, str]]:
        (block_id,) = block_ids
        return None, {block_id: await self.blocks.upload(block_id)}

    async def _upload(self, block_ids: list[str], uploaded: dict[str, tuple[str, str | None]]
                      ) -> None:
        """Upload blocks, one as its own object or several as a pack, with backoff like
        `_retry_async`, and record them as uploaded.

        A block deleted while its upload keeps failing (an outage) is left out of the next
        attempt, and its disk space freed at once: on a full cache disk that space is what
        writers wait for (tests/test_fullcache.py). This cycle's snapshot still names it, so
        the cycle fails and the next one goes without it. Only after a failure: a block
        deleted between the seal and its first attempt is uploaded all the same, or under
        steady deletes every cycle would fail and none would ever publish (the soak test
        saw 0 checkpoints in 300 s).
        """
        block_ids = list(block_ids)
        put: Callable[[list[str]], Awaitable[tuple[str | None, dict[str, str]]]] = (
            self.blocks.upload_pack if len(block_ids) > 1 else self._put_single)
        count = len(block_ids)
        length = sum(self.blocks.dirty_length(b) for b in block_ids)
        self.uploading_blocks += count
        self.uploading_bytes += length
        backoff = Backoff(0.2, 30.0)
        attempt = 0
        try:
            while True:
                for block_id in [b for b in block_ids if attempt and self.blocks.is_doomed(b)]:
                    block_ids.remove(block_id)
                    self.blocks.retire(block_id, None)
                if not block_ids:
                    return
                attempt += 1
                try:
                    pack, csums = await put(block_ids)
                    break
                except Exception as e:
                    self.retries += 1
                    what = block_ids[0] if len(block_ids) == 1 else f"{len(block_ids)} blocks"
                    self.last_error = f"upload {what}: {e}"
                    log.warning("upload of %s failed (attempt %d), retrying in %.1fs: %s", what,
                                attempt, backoff.delay, e)
                deadline = trio.current_time() + backoff.next()
                while (left := deadline - trio.current_time()) > 0:
                    if any(self.blocks.is_doomed(b) for b in block_ids):
                        break
                    await trio.sleep(min(0.2, left))
        finally:
            self.uploading_blocks -= count
            self.uploading_bytes -= length
        uploaded.update((b, (c, pack)) for b, c in csums.items())
        size = sum(self.blocks.dirty_length(b) for b in block_ids)  # still dirty: see below
        self._own(self.meta.set_uploaded, csums, pack, size)
        if pack is not None and not self.meta.pack_in_use(pack):
            # Every member was deleted during the upload: nothing will ever drop the pack.
            self._own(self.meta.add_garbage, [pack])
        self.blocks.uploaded(block_ids)  # their files go once the checksums are committed
        self.uploaded_blocks += len(block_ids)
        self.uploaded_bytes += length

    async def _collect(self, garbage: list[str]) -> bool:
        """Delete garbage that no kept checkpoint names (retain.py says which); False if the
        store refused (the rows stay for a later pass)."""
        keys = [object_key(b) for b in garbage]
        try:
            await self._retry(lambda: self.store.delete_many(keys), "delete garbage", tries=3)
        except Exception as e:
            log.warning("could not delete %d unreferenced blocks: %s", len(keys), e)
            return False
        self._own(self.meta.remove_garbage, garbage)
        return True

    async def _retry(self, fn: Callable[[], T], what: str, tries: int | None = None) -> T:
        async def run() -> T:
            return await trio.to_thread.run_sync(fn, limiter=self.limiter)

        return await self._retry_async(run, what, tries)

    async def _retry_async(
        self, fn: Callable[[], Awaitable[T]], what: str, tries: int | None = None
    ) -> T:
        """Retry with exponential backoff; callers bound the total time with cancel scopes."""
        backoff = Backoff(0.2, 30.0)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except Exception as e:
                if tries is not None and attempt >= tries:
                    raise
                self.retries += 1
                self.last_error = f"{what}: {e}"
                log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt,
                            backoff.delay, e)
                await backoff.sleep()
