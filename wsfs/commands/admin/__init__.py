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
    pages = await _fetch_pages(store, sorted({d for m in manifests.values() for d in m.pages}))
    out = {}
    for seq, manifest in manifests.items():
        path = directory / f"checkpoint-{seq}.db"
        with open(path, "wb") as f:
            for digest in manifest.pages:
                f.write(pages[digest])
        out[seq] = (manifest, path)
    return out


def each_database(store: ObjectStore, manifests: list[ckpt.Manifest], directory: Path
                  ) -> Iterator[tuple[ckpt.Manifest, Path | None]]:
    """Each checkpoint of `manifests` as a SQLite file in `directory`, one at a time (the
    file is overwritten by the next): the kept checkpoints of a month are hundreds of
    databases, too many to hold at once, but neighbours share most pages, so the pages of the
    previous one are kept and only the others fetched (in parallel, each verified). None for
    a checkpoint thinned while it was read (a page, or its manifest, gone)."""
    cache: dict[str, bytes] = {}
    path = directory / "checkpoint.db"
    for manifest in sorted(manifests, key=lambda m: m.seq):
        wanted = set(manifest.pages)
        cache = {d: data for d, data in cache.items() if d in wanted}
        lost = False
        try:
            cache.update(trio.run(_fetch_pages, store, sorted(wanted - set(cache))))
        except* NoSuchKey:
            if store.head(ckpt.manifest_key(manifest.seq)) is not None:
                raise StoreError(f"a metadata page of checkpoint {manifest.seq} is missing "
                                 f"from {store.url}; run wsfs fsck") from None
            lost = True
        if lost:
            yield manifest, None
            continue
        with open(path, "wb") as f:
            for digest in manifest.pages:
                f.write(cache[digest])
        yield manifest, path


async def _fetch_pages(store: ObjectStore, digests: list[str]) -> dict[str, bytes]:
    limiter = trio.CapacityLimiter(FETCH_THREADS)
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
        for digest in digests:
            nursery.start_soon(get_page, digest)
    return pages


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
