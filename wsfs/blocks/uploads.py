"""Uploads of sealed dirty blocks, alone or as packs (pack.py), keeping clean copies.

The sync layer seals and retires blocks (dirty.py) and retries; this module only moves the
bytes: a block's file is read once, and the same bytes serve the upload and the clean copy.
"""

from __future__ import annotations

import secrets

import trio

from ..store import ObjectStore
from . import pack as packs
from .clean import CleanCache
from .dirtyfiles import DirtyFiles
from .files import checksum, object_key
from .space import DiskSpace

# Packs being uploaded at once. Each holds its members, the pack built from them and the
# HTTP client's buffers (~12 MiB for a full pack): with the store's 32 threads all on packs,
# a flush of 256 MiB peaked at 300 MB of RSS. Eight keep a store that answers in 50 ms
# busy at ~600 MB/s.
PACK_UPLOADS = 8


class Uploads:
    """Puts sealed blocks into the object store (see the module docstring)."""

    def __init__(self, store: ObjectStore, *, files: DirtyFiles, clean: CleanCache,
                 space: DiskSpace, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.files = files
        self.clean = clean
        self.space = space  # a nearly full disk keeps no clean copies
        self.limiter = limiter
        self._pack_uploads = trio.CapacityLimiter(PACK_UPLOADS)

    async def upload(self, block_id: str) -> str:
        """Upload a sealed block and keep a clean copy; return its checksum.

        Retries are the caller's business. The clean copy is made from the bytes already in
        memory, so a block is read from disk once however it ends.
        """

        def work() -> str:
            data = self.files.path(block_id).read_bytes()
            self.store.put(object_key(block_id), data)
            self._keep_uploaded({block_id: data})
            return checksum(data)

        return await trio.to_thread.run_sync(work, limiter=self.limiter)

    async def upload_pack(self, block_ids: list[str]) -> tuple[str, dict[str, str]]:
        """Upload sealed blocks as one pack (see pack.py); return its id and their checksums."""

        def work() -> tuple[str, dict[str, str]]:
            members = [(b, self.files.path(b).read_bytes()) for b in block_ids]
            blob, csums = packs.build(members)
            pack_id = secrets.token_hex(16)
            self.store.put(object_key(pack_id), blob)
            self._keep_uploaded(dict(members))
            return pack_id, csums

        async with self._pack_uploads:
            return await trio.to_thread.run_sync(work, limiter=self.limiter)

    def _keep_uploaded(self, members: dict[str, bytes]) -> None:
        """Keep clean copies of just-uploaded blocks, unless the cache disk is nearly full:
        there the copies would take the room the uploads are about to free."""
        if self.space.room_to_keep(sum(len(d) for d in members.values())):
            self.clean.keep(members)
