"""Managing workspaces in a store without mounting them: du, ls, gc, destroy.

These commands read a workspace the way a fresh mount would — the superblock, then the newest
checkpoints fetched into a temporary directory — and never need a mount or a cache dir. The
helpers here are what they share: reading checkpoints, and listing objects with their ages.
"""

from __future__ import annotations

import hashlib
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path

import trio

from ...errors import StoreError
from ...meta import checkpoint as ckpt
from ...meta import schema
from ...store import NoSuchKey, ObjectStore

FETCH_THREADS = 16


def list_detailed(store: ObjectStore, prefix: str = "") -> Iterator[tuple[str, int, float | None]]:
    """(key, size, mtime) for every object under `prefix`; mtime None if the store can't say."""
    detailed = getattr(store, "list_detailed", None)
    if detailed is not None:
        yield from detailed(prefix)
        return
    for key, size in store.list(prefix):
        yield key, size, None


def manifest_seqs(store: ObjectStore) -> list[int]:
    """Sequence numbers of the checkpoints whose manifests are in the store, oldest first."""
    seqs = []
    for key, _ in store.list(ckpt.MANIFEST_PREFIX):
        name = key[len(ckpt.MANIFEST_PREFIX):]
        if name.endswith(".json") and name[:-5].isdigit():
            seqs.append(int(name[:-5]))
    return sorted(seqs)


def fetch_databases(store: ObjectStore, seqs: list[int], directory: Path
                    ) -> dict[int, tuple[ckpt.Manifest, Path]]:
    """Download checkpoints `seqs` into `directory` as SQLite files, each page fetched once.

    A manifest that disappeared meanwhile (pruned by a mounted writer) is left out of the
    result; the caller decides whether that matters. Every page is verified against its hash.
    """
    return trio.run(_fetch_databases, store, seqs, directory)


async def _fetch_databases(store: ObjectStore, seqs: list[int], directory: Path
                           ) -> dict[int, tuple[ckpt.Manifest, Path]]:
    limiter = trio.CapacityLimiter(FETCH_THREADS)
    manifests: dict[int, ckpt.Manifest] = {}

    async def get_manifest(seq: int) -> None:
        try:
            data = await trio.to_thread.run_sync(store.get, ckpt.manifest_key(seq),
                                                 limiter=limiter)
        except NoSuchKey:
            return
        manifests[seq] = ckpt.Manifest.decode(data)

    async with trio.open_nursery() as nursery:
        for seq in seqs:
            nursery.start_soon(get_manifest, seq)
    pages: dict[str, bytes] = {}

    async def get_page(digest: str) -> None:
        def work() -> bytes:
            data = zlib.decompress(store.get(ckpt.page_key(digest)))
            if hashlib.sha256(data).hexdigest() != digest:
                raise StoreError(f"metadata page {digest} in {store.url} is corrupt; "
                                 "restore it from a backup of the bucket")
            return data

        pages[digest] = await trio.to_thread.run_sync(work, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for digest in sorted({d for m in manifests.values() for d in m.pages}):
            nursery.start_soon(get_page, digest)
    out = {}
    for seq, manifest in manifests.items():
        path = directory / f"checkpoint-{seq}.db"
        with open(path, "wb") as f:
            for digest in manifest.pages:
                f.write(pages[digest])
        out[seq] = (manifest, path)
    return out


def data_objects(db: Path) -> set[str]:
    """The ids of the data objects (single blocks and packs) a checkpoint database references.

    Opened read-write: a checkpoint of an older format is upgraded in place (it is a copy).
    """
    conn = sqlite3.connect(db)
    try:
        schema.upgrade(conn)
        return schema.referenced_objects(conn)
    finally:
        conn.close()
