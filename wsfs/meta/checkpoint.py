"""Metadata checkpoints: the database published to the store as a consistent snapshot.

A checkpoint is a copy of `meta.db` taken inside one read transaction, split into 64 KiB pages.
Each page is stored once under its content hash (`meta/pages/<sha256>`, zlib-compressed), so a
checkpoint costs the pages that changed, not the whole database. A manifest
(`meta/manifests/<seq>.json`) lists the pages in order; `meta/HEAD` names the newest manifest and
is written last, so a reader sees the previous checkpoint or the new one, never a mix.

Both are written conditionally, which is what fences a mount that lost the workspace (paused,
cut off, or taken over with --force) whatever the clocks say: a manifest is immutable
(`If-None-Match: *`: an existing number means another publication), and HEAD is replaced only
if it is still the object this mount last wrote or read (`If-Match` on its ETag). A mount
that takes the workspace over rewrites HEAD first (`claim_head`, naming itself), so an old
holder's publication in flight fails at its HEAD even if its manifest landed.

A mount on an empty cache needs every page, and at one request each a 100,000-file database
(~550 pages) cost seconds of per-request overhead. So the unmount's final checkpoint also
writes a bundle (`meta/bundles/<seq>`): its distinct pages, compressed, back to back, with
their sizes in the manifest; `fetch` reads it in a few ranged GETs and falls back to the pages
when it is missing or damaged. The pages stay the truth (later checkpoints reuse them); a
bundle is deleted with its manifest.

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ..errors import LeaseError
from ..store import NoSuchKey, ObjectStore, replace_if
from .db import connect

log = logging.getLogger(__name__)

PAGE_SIZE = 64 * 1024
HEAD_KEY = "meta/HEAD"
MANIFEST_PREFIX = "meta/manifests/"
PAGE_PREFIX = "meta/pages/"
BUNDLE_PREFIX = "meta/bundles/"
BUNDLE_MIN_PAGES = 8  # a smaller database is fetched page by page about as fast
BUNDLE_PART = 4 << 20  # compressed bytes per ranged GET of a bundle (they run in parallel)


class CorruptCheckpoint(Exception):
    """A page or manifest does not match its checksum."""


class SeqTaken(Exception):
    """Another publication's manifest has this sequence number: a mount that published since
    (this one is fenced), or the orphan of a fenced mount whose HEAD was refused (the number
    is skipped); the flusher tells the two apart by HEAD."""


# What a fenced mount's messages tell the user to do.
FENCED_FIX = ("this mount takes no more writes (EROFS) and publishes nothing; unmount it: "
              "what it accepted that the store lacks comes back under /.wsfs-conflicts/ at "
              "the next mount from its cache dir")


def head_record(seq: int, mount_id: str) -> bytes:
    """meta/HEAD's content: the newest checkpoint, and the mount that wrote it (which makes
    each mount's HEAD distinct, so its ETag tells whether another mount wrote since)."""
    return json.dumps({"seq": seq, "mount_id": mount_id}).encode()


def claim_head(store: ObjectStore, mount_id: str) -> tuple[int, str] | None:
    """Rewrite HEAD naming this mount (blocking); return (its seq, its new ETag), or None if
    the workspace has no checkpoint yet.

    Called once the lease is taken, before the cache dir is brought up to date: from here
    on a publication by any earlier holder fails at its HEAD (its ETag is stale), even one
    whose lease check passed before it paused.
    """
    try:
        data, tag = store.get_tagged(HEAD_KEY)
    except NoSuchKey:
        return None
    seq = int(json.loads(data)["seq"])
    new = replace_if(store, HEAD_KEY, head_record(seq, mount_id), tag)
    if new is None:
        raise LeaseError("another mount published to this workspace while this one was "
                         "starting; mount again once it is unmounted")
    return seq, new


# The copy of the newest checkpoint a cache dir published (kept by the flusher): what the
# store got from it, to tell what it did not (wsfs/daemon/conflicts.py).
PUBLISHED = "published.db"


def manifest_key(seq: int) -> str:
    return f"{MANIFEST_PREFIX}{seq:012d}.json"


def page_key(digest: str) -> str:
    return f"{PAGE_PREFIX}{digest}"


def bundle_key(seq: int) -> str:
    return f"{BUNDLE_PREFIX}{seq:012d}"


@dataclass(frozen=True, slots=True)
class Manifest:
    seq: int
    created_ns: int
    size: int
    pages: tuple[str, ...]
    # The compressed size of each distinct page (first-appearance order) in this checkpoint's
    # bundle, or None if it has none. Readers that predate bundles ignore the field.
    bundle: tuple[int, ...] | None = None
    # Published by a version that keeps the objects of every kept checkpoint (retention.py):
    # an older version deleted garbage right after the next checkpoint, so its checkpoints
    # but the newest may lack objects, and the schedule does not keep them.
    whole: bool = True

    def encode(self) -> bytes:
        d: dict[str, object] = {
            "format": 1, "seq": self.seq, "created_ns": self.created_ns, "size": self.size,
            "page_size": PAGE_SIZE, "pages": list(self.pages)}
        if self.bundle is not None:
            d["bundle"] = list(self.bundle)
        if self.whole:
            d["whole"] = True
        return json.dumps(d).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        if d.get("page_size") != PAGE_SIZE:
            raise CorruptCheckpoint(f"manifest page size {d.get('page_size')} is not supported")
        bundle = d.get("bundle")
        return cls(int(d["seq"]), int(d["created_ns"]), int(d["size"]), tuple(d["pages"]),
                   None if bundle is None else tuple(int(n) for n in bundle),
                   bool(d.get("whole", False)))

    def distinct_pages(self) -> list[str]:
        """The page digests without repeats, in order of first appearance (the bundle's)."""
        return list(dict.fromkeys(self.pages))


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


def finalize(path: Path, uploaded: dict[str, tuple[str, str | None]], seq: int
             ) -> list[tuple[str, int | None]]:
    """Fill in the checksums and packs (block id -> (checksum, pack)) of the blocks uploaded
    for this checkpoint, and their objects' birth (this checkpoint, the first to name them).

    Returns (id, born) of the garbage this checkpoint is the first to leave out: objects the
    tree stopped referencing since the previous checkpoint, whose run of naming checkpoints
    therefore ends at `seq - 1` (set here in the copy; the caller sets it in the live database once
    this checkpoint is published). Whether they may leave the store is retention's question
    (meta/retention.py). Raises if any referenced block still lacks a checksum, which would
    mean a block the store may not hold (the invariant, checked not assumed).
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
        conn.executemany("INSERT OR IGNORE INTO objects (id, born) VALUES (?, ?)",
                         [(p or i, seq) for i, (_c, p) in uploaded.items()])
        garbage = [(str(r[0]), r[1]) for r in conn.execute(
            "SELECT id, born FROM garbage WHERE died IS NULL")]
        conn.execute("UPDATE garbage SET died=? WHERE died IS NULL", (seq - 1,))
        conn.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('checkpoint_seq', ?)",
            (str(seq),),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return garbage


def split_pages(
    path: Path, known: set[str], keep_all: bool = False
) -> tuple[list[str], dict[str, bytes]]:
    """Cut the file into pages: the digest of each in order, and the compressed content of
    those not in `known`, or of every page with `keep_all` (blocking: hashes the whole file).

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
            if (keep_all or digest not in known) and digest not in new:
                new[digest] = zlib.compress(chunk, 1)
    return digests, new


async def publish(
    store: ObjectStore,
    path: Path,
    seq: int,
    known_pages: set[str],
    limiter: trio.CapacityLimiter,
    *,
    created_ns: int | None = None,
    bundle: bool = False,
    head_etag: str | None = None,
    mount_id: str = "",
) -> tuple[Manifest, str]:
    """Upload the pages the store lacks (and, with `bundle`, the bundle), then the manifest,
    then HEAD (in that order); return the manifest and HEAD's new ETag.

    `created_ns` (default: now) names this publication: the flusher records it before it
    starts, so that a cache dir can tell its own checkpoint from another mount's of the same
    number (workspace.py). HEAD is replaced only if its ETag is still `head_etag` (None: it
    must not exist yet, the workspace's first checkpoint); else LeaseError. A manifest of
    this number that is not this publication's (a retry finds its own) raises SeqTaken."""
    digests, blobs = await trio.to_thread.run_sync(split_pages, path, known_pages, bundle,
                                                   limiter=limiter)
    new = [d for d in blobs if d not in known_pages]
    sizes: tuple[int, ...] | None = None

    async def put(key: str, blob: bytes) -> None:
        await trio.to_thread.run_sync(store.put, key, blob, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for digest in new:
            nursery.start_soon(put, page_key(digest), blobs[digest])
        if bundle and len(blobs) >= BUNDLE_MIN_PAGES:
            order = list(dict.fromkeys(digests))  # == blobs' order: every page was kept
            sizes = tuple(len(blobs[d]) for d in order)
            nursery.start_soon(put, bundle_key(seq), b"".join(blobs[d] for d in order))
    del blobs
    manifest = Manifest(seq, created_ns or time.time_ns(), os.path.getsize(path),
                        tuple(digests), sizes)
    log.debug("checkpoint %d: %d of %d pages new%s", seq, len(new), len(digests),
              "" if sizes is None else ", bundled")

    def put_manifest() -> str:
        key, data = manifest_key(seq), manifest.encode()
        if not store.put_if_absent(key, data):
            try:
                raw = store.get(key)
                there: Manifest | None = Manifest.decode(raw)
            except (NoSuchKey, ValueError, KeyError, CorruptCheckpoint):
                raw, there = b"", None
            if there is None or there.created_ns != manifest.created_ns:
                raise SeqTaken(seq)
            if raw != data:
                # This cache dir's own earlier attempt at this publication (the creation
                # time is recorded before it starts): a cycle that failed, or a daemon killed,
                # before HEAD named it. Never named, so replaced by the newer snapshot.
                store.put(key, data)
        record = head_record(seq, mount_id)
        if head_etag is None:
            created = store.put_if_absent(HEAD_KEY, record)
            found, now = store.get_tagged(HEAD_KEY)  # (refused: ours if it is our record)
            tag: str | None = now if created or found == record else None
        else:
            tag = replace_if(store, HEAD_KEY, record, head_etag)
        if tag is None:
            raise LeaseError("another mount published to this workspace (meta/HEAD changed "
                             f"since this mount last wrote it); {FENCED_FIX}")
        return tag

    tag = await trio.to_thread.run_sync(put_manifest, limiter=limiter)
    return manifest, tag


# How many times a reader of the newest checkpoint (fsck, du) starts again when a mount
# published a newer one meanwhile and objects only the older one named are gone.
RECHECKS = 5


def read_head(store: ObjectStore) -> int | None:
    """The sequence number of the newest checkpoint, or None if none was ever published."""
    try:
        return int(json.loads(store.get(HEAD_KEY))["seq"])
    except NoSuchKey:
        return None


def read_manifest(store: ObjectStore, seq: int) -> Manifest:
    """The manifest of checkpoint `seq` (blocking)."""
    return Manifest.decode(store.get(manifest_key(seq)))


async def fetch(
    store: ObjectStore, seq: int, path: Path, limiter: trio.CapacityLimiter,
    *, use_bundle: bool = True, have: tuple[Path, Manifest] | None = None,
) -> Manifest:
    """Download checkpoint `seq` into a database file at `path`, verifying every page.

    From its bundle when it has one (a few requests), else page by page; fsck passes
    `use_bundle=False`, since later checkpoints reuse the pages and so every one must be
    there. Each page is written at its offsets as it arrives, never held in memory whole.
    `have`: a local copy of an earlier checkpoint and its manifest; the pages both share are
    read from it (each checked against its hash: the copy may have been opened and changed
    since) and only the others downloaded, page by page: a read-only mount that follows the
    writer fetches what each checkpoint changed, not the whole database.
    """
    manifest = await trio.to_thread.run_sync(read_manifest, store, seq, limiter=limiter)
    order = manifest.distinct_pages()
    offsets: dict[str, list[int]] = {}
    for i, digest in enumerate(manifest.pages):
        offsets.setdefault(digest, []).append(i * PAGE_SIZE)
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        def place(digest: str, blob: bytes) -> None:
            """Check one page and write it wherever the database has it (blocking)."""
            try:
                data = zlib.decompress(blob)
            except zlib.error:
                raise CorruptCheckpoint(f"metadata page {digest} is corrupt") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise CorruptCheckpoint(f"metadata page {digest} is corrupt")
            for offset in offsets[digest]:
                if len(data) != min(PAGE_SIZE, manifest.size - offset):
                    raise CorruptCheckpoint(f"checkpoint {seq} does not add up to "
                                            f"{manifest.size} bytes")
                os.pwrite(fd, data, offset)

        fetched = False
        if have is not None:
            local = await trio.to_thread.run_sync(_copy_pages, have, order, offsets, fd,
                                                  limiter=limiter)
            if local:
                order = [d for d in order if d not in local]
                use_bundle = False  # most of it is here: the rest page by page
        if use_bundle and manifest.bundle is not None and len(manifest.bundle) == len(order):
            try:
                await _fetch_bundle(store, seq, order, manifest.bundle, place, limiter)
                fetched = True
            except* (NoSuchKey, CorruptCheckpoint) as group:
                log.warning("the bundle of checkpoint %d is unusable (%s); fetching its %d "
                            "pages one by one", seq, group.exceptions[0], len(order))
        if not fetched:
            async def get_page(digest: str) -> None:
                def work() -> None:
                    place(digest, store.get(page_key(digest)))

                await trio.to_thread.run_sync(work, limiter=limiter)

            async with trio.open_nursery() as nursery:
                for digest in order:
                    nursery.start_soon(get_page, digest)

        def finish() -> None:
            os.fsync(fd)
            size = os.fstat(fd).st_size
            if size != manifest.size:
                raise CorruptCheckpoint(f"checkpoint {seq} has {size} bytes, not {manifest.size}")

        await trio.to_thread.run_sync(finish, limiter=limiter)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return manifest


def _copy_pages(have: tuple[Path, Manifest], wanted: list[str], offsets: dict[str, list[int]],
                fd: int) -> set[str]:
    """Write the pages of `wanted` that the local copy `have` holds intact at their
    `offsets` in `fd`; return their digests (blocking)."""
    path, manifest = have
    at: dict[str, int] = {}
    for i, digest in enumerate(manifest.pages):
        at.setdefault(digest, i * PAGE_SIZE)
    copied: set[str] = set()
    try:
        src = os.open(path, os.O_RDONLY)
    except OSError:
        return copied
    try:
        for digest in wanted:
            if digest not in at:
                continue
            data = os.pread(src, PAGE_SIZE, at[digest])
            if hashlib.sha256(data).hexdigest() != digest:
                continue
            for offset in offsets[digest]:
                os.pwrite(fd, data, offset)
            copied.add(digest)
    finally:
        os.close(src)
    return copied


async def _fetch_bundle(
    store: ObjectStore, seq: int, order: list[str], sizes: tuple[int, ...],
    place: Callable[[str, bytes], None], limiter: trio.CapacityLimiter,
) -> None:
    """Read a bundle in ranged GETs of about BUNDLE_PART bytes each, in parallel."""
    parts: list[tuple[int, list[tuple[str, int]]]] = []  # (start, [(digest, size)])
    start = end = 0
    for digest, size in zip(order, sizes, strict=True):
        if not parts or end - start >= BUNDLE_PART:
            parts.append((end, []))
            start = end
        parts[-1][1].append((digest, size))
        end += size
    key = bundle_key(seq)

    def work(offset: int, pages: list[tuple[str, int]]) -> None:
        length = sum(size for _, size in pages)
        blob = (store.get(key) if len(parts) == 1
                else store.get_range(key, offset, length))
        if len(blob) != length:
            raise CorruptCheckpoint(f"bundle {key} is {len(blob)} bytes short or long")
        view = memoryview(blob)
        pos = 0
        for digest, size in pages:
            place(digest, bytes(view[pos:pos + size]))
            pos += size

    async with trio.open_nursery() as nursery:
        for offset, pages in parts:
            nursery.start_soon(partial(trio.to_thread.run_sync, work, offset, pages,
                                       limiter=limiter))
