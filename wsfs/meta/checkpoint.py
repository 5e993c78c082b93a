"""Metadata checkpoints: the database published to the store as a consistent snapshot.

A checkpoint is a copy of `meta.db` taken inside one read transaction, split into 64 KiB pages.
Each page is stored once under its content hash (`meta/pages/<sha256>`, zlib-compressed), so a
checkpoint costs the pages that changed, not the whole database. A manifest
(`meta/manifests/<seq>.json`) lists the pages in order; `meta/HEAD` names the newest manifest and
is written last, so a reader sees the previous checkpoint or the new one, never a mix.

The sync layer decides *when* a checkpoint may be published (after every block it references is
in the store); this module only knows how to take, patch, publish and fetch one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import trio

from ..store import NoSuchKey, ObjectStore
from .db import connect

log = logging.getLogger(__name__)

PAGE_SIZE = 64 * 1024
HEAD_KEY = "meta/HEAD"
MANIFEST_PREFIX = "meta/manifests/"
PAGE_PREFIX = "meta/pages/"
KEEP_MANIFESTS = 5


class CorruptCheckpoint(Exception):
    """A page or manifest does not match its checksum."""


def manifest_key(seq: int) -> str:
    return f"{MANIFEST_PREFIX}{seq:012d}.json"


def page_key(digest: str) -> str:
    return f"{PAGE_PREFIX}{digest}"


@dataclass(frozen=True, slots=True)
class Manifest:
    seq: int
    created_ns: int
    size: int
    pages: tuple[str, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {"format": 1, "seq": self.seq, "created_ns": self.created_ns, "size": self.size,
             "page_size": PAGE_SIZE, "pages": list(self.pages)}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        if d.get("page_size") != PAGE_SIZE:
            raise CorruptCheckpoint(f"manifest page size {d.get('page_size')} is not supported")
        return cls(int(d["seq"]), int(d["created_ns"]), int(d["size"]), tuple(d["pages"]))


class PinnedSnapshot:
    """A read transaction on a second connection: the database exactly as it was when pinned.

    Pinning is instant (it runs in the trio thread, atomically with sealing the dirty blocks);
    the copy is made later in a worker thread while the filesystem keeps changing the database.
    """

    def __init__(self, db_path: Path) -> None:
        self.conn = connect(db_path)
        # The copy reads every page once: a page cache as big as the live connection's would
        # only hold a second copy of the database in memory for the length of the copy.
        self.conn.execute("PRAGMA cache_size=-2048")
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT count(*) FROM settings").fetchone()

    def copy_to(self, path: Path) -> None:
        """Write the pinned state to `path` as a standalone database (blocking)."""
        path.unlink(missing_ok=True)
        dst = sqlite3.connect(path)
        try:
            self.conn.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()

    def release(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


def finalize(path: Path, uploaded: dict[str, tuple[str, str | None]], seq: int) -> list[str]:
    """Fill in the checksums and packs (block id -> (checksum, pack)) of the blocks uploaded
    for this checkpoint and empty its garbage.

    Returns the garbage ids: objects the checkpoint no longer references, safe to delete from
    the store once it is published. Raises if any referenced block still lacks a checksum,
    which would mean a block the store may not hold (the invariant, checked not assumed).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "UPDATE blocks SET csum=?, pack=? WHERE id=? AND csum IS NULL",
            [(c, p, i) for i, (c, p) in uploaded.items()],
        )
        missing = conn.execute("SELECT count(*) FROM blocks WHERE csum IS NULL").fetchone()[0]
        if missing:
            conn.execute("ROLLBACK")
            raise RuntimeError(f"checkpoint would reference {missing} blocks not in the store")
        garbage = [r[0] for r in conn.execute("SELECT id FROM garbage")]
        conn.execute("DELETE FROM garbage")
        conn.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('checkpoint_seq', ?)",
            (str(seq),),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return garbage


def split_pages(path: Path, known: set[str]) -> tuple[list[str], dict[str, bytes]]:
    """Cut the file into pages: the digest of each in order, and the compressed content of
    those not in `known` (blocking: hashes the whole file).

    Only the new pages are kept in memory, compressed: a 100,000-file database is ~35 MB, and
    holding all of it, every flush cycle, in the worker threads' malloc arenas is what made a
    daemon creating that tree reach 700 MB of RSS.
    """
    digests: list[str] = []
    new: dict[str, bytes] = {}
    with open(path, "rb") as f:
        while chunk := f.read(PAGE_SIZE):
            digest = hashlib.sha256(chunk).hexdigest()
            digests.append(digest)
            if digest not in known and digest not in new:
                new[digest] = zlib.compress(chunk, 1)
    return digests, new


async def publish(
    store: ObjectStore,
    path: Path,
    seq: int,
    known_pages: set[str],
    limiter: trio.CapacityLimiter,
) -> Manifest:
    """Upload the pages the store lacks, then the manifest, then HEAD (in that order)."""
    digests, new = await trio.to_thread.run_sync(split_pages, path, known_pages,
                                                 limiter=limiter)

    async def put_page(digest: str, blob: bytes) -> None:
        await trio.to_thread.run_sync(store.put, page_key(digest), blob, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for digest, blob in new.items():
            nursery.start_soon(put_page, digest, blob)
    manifest = Manifest(seq, time.time_ns(), os.path.getsize(path), tuple(digests))
    log.debug("checkpoint %d: %d of %d pages new", seq, len(new), len(digests))

    def put_manifest() -> None:
        store.put(manifest_key(seq), manifest.encode())
        store.put(HEAD_KEY, json.dumps({"seq": seq}).encode())

    await trio.to_thread.run_sync(put_manifest, limiter=limiter)
    return manifest


def read_head(store: ObjectStore) -> int | None:
    """The sequence number of the newest checkpoint, or None if none was ever published."""
    try:
        return int(json.loads(store.get(HEAD_KEY))["seq"])
    except NoSuchKey:
        return None


async def fetch(
    store: ObjectStore, seq: int, path: Path, limiter: trio.CapacityLimiter
) -> Manifest:
    """Download checkpoint `seq` into a database file at `path`, verifying every page."""
    manifest = Manifest.decode(
        await trio.to_thread.run_sync(store.get, manifest_key(seq), limiter=limiter)
    )
    unique = sorted(set(manifest.pages))
    contents: dict[str, bytes] = {}

    async def get_page(digest: str) -> None:
        def work() -> bytes:
            try:
                data = zlib.decompress(store.get(page_key(digest)))
            except zlib.error:
                raise CorruptCheckpoint(f"metadata page {digest} is corrupt") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise CorruptCheckpoint(f"metadata page {digest} is corrupt")
            return data

        contents[digest] = await trio.to_thread.run_sync(work, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for digest in unique:
            nursery.start_soon(get_page, digest)

    def write() -> None:
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            for digest in manifest.pages:
                f.write(contents[digest])
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        if size != manifest.size:
            raise CorruptCheckpoint(f"checkpoint {seq} has {size} bytes, not {manifest.size}")
        os.replace(tmp, path)

    await trio.to_thread.run_sync(write, limiter=limiter)
    return manifest


def prune(store: ObjectStore, newest: int) -> None:
    """Delete manifests older than the last KEEP_MANIFESTS and pages only they used (blocking).

    Older checkpoints are kept so that an operator can roll back a few steps; the block
    objects they reference may already be gone (garbage is collected against the newest).
    """
    keys = [k for k, _ in store.list(MANIFEST_PREFIX)]
    old = [k for k in keys
           if int(k[len(MANIFEST_PREFIX):].split(".")[0]) <= newest - KEEP_MANIFESTS]
    if not old:
        return
    kept = [k for k in keys if k not in old]
    live: set[str] = set()
    for k in kept:
        live.update(Manifest.decode(store.get(k)).pages)
    dead: set[str] = set()
    for k in old:
        try:
            dead.update(Manifest.decode(store.get(k)).pages)
        except NoSuchKey:
            continue
    store.delete_many([page_key(d) for d in dead - live])
    store.delete_many(old)
    log.debug("pruned %d manifests and %d pages", len(old), len(dead - live))
