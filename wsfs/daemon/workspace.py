"""A workspace in a store: its creation, and bringing a cache dir up to date with it.

A workspace is created with a root directory and the marker `/.workspace.initialized`, and is
published as checkpoint 1 through the same flush cycle every later change goes through.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path

import trio

from .. import __version__
from ..cachedir import CacheDir
from ..errors import (
    DamageError,
    MountError,
    NoWorkspaceError,
    StoreError,
    WsfsError,
)
from ..meta import Metadata
from ..meta import checkpoint as ckpt
from ..meta.schema import MARKER, ROOT
from ..meta.superblock import (
    DEFAULT_BLOCK_SIZE,
    FORMAT,
    SUPERBLOCK_KEY,
    Superblock,
)
from ..meta.times import now_ns
from ..store import NoSuchKey, ObjectStore
from ..sync.flusher import Flusher
from .wiring import open_cache

log = logging.getLogger(__name__)


def marker_content(workspace_id: str, framework: str | None, labels: dict[str, str]) -> bytes:
    return json.dumps(
        {"workspace_id": workspace_id,
         "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "wsfs_version": __version__, "framework": framework, "labels": labels},
        indent=1,
    ).encode() + b"\n"


async def create(
    store: ObjectStore,
    *,
    framework: str | None = None,
    labels: dict[str, str] | None = None,
    owner: tuple[int, int] = (0, 0),
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Superblock:
    """Create a workspace: root directory, marker, checkpoint 1, then the superblock."""
    if await trio.to_thread.run_sync(store.head, SUPERBLOCK_KEY) is not None:
        raise WsfsError(f"{store.url} already holds a workspace; mount it instead")
    sb = Superblock(FORMAT, uuid.uuid4().hex, block_size, time.time_ns())
    limiter = trio.CapacityLimiter(16)
    with tempfile.TemporaryDirectory(prefix="wsfs-init-") as tmp:
        cache = Path(tmp)
        blocks, meta = open_cache(cache, store, block_size=block_size, limiter=limiter)
        try:
            now = time.time_ns()
            uid, gid = owner
            meta.create_inode(stat.S_IFDIR | 0o755, uid, gid, now, nlink=2, ino=ROOT)
            content = marker_content(sb.workspace_id, framework, labels or {})
            marker = meta.create_inode(stat.S_IFREG | 0o444, uid, gid, now, size=len(content))
            meta.add_entry(ROOT, MARKER, marker.id)
            meta.set_block(marker.id, 0, blocks.create(content))
            meta.set_setting("workspace_id", sb.workspace_id)
            flusher = Flusher(meta, blocks, store, cache, flush_delay=0, limiter=limiter)
            await flusher.cycle()
        finally:
            blocks.close()
            meta.close()
    await trio.to_thread.run_sync(store.put, SUPERBLOCK_KEY, sb.encode())
    return sb


async def prefetch(
    store: ObjectStore, sb: Superblock, cache_dir: Path, limiter: trio.CapacityLimiter
) -> int:
    """Fetch the newest checkpoint into `cache_dir/prefetch.db` while the lease is being
    taken; return its sequence number (0: nothing fetched; errors are left to prepare_cache).

    Only a guess: until the lease is ours another mount may still publish, so
    `prepare_cache` reads HEAD again once it is, and uses this copy only if it is still the
    newest. An empty cache dir then pays the lease's round trips and the download at once.
    """
    layout = CacheDir(cache_dir)
    if layout.meta_db.exists():
        return 0
    try:
        head = await trio.to_thread.run_sync(ckpt.read_head, store, limiter=limiter)
        if head is None:
            return 0
        await ckpt.fetch(store, head, layout.prefetch, limiter)
        await trio.to_thread.run_sync(_adopt, layout.prefetch, sb, limiter=limiter)
    except Exception as e:  # prepare_cache fetches again, and reports the error
        log.debug("prefetching the checkpoint failed: %s", e)
        return 0
    return head


def drop_prefetched(cache_dir: Path) -> None:
    """Remove what `prefetch` fetched, for a mount that did not get the lease."""
    layout = CacheDir(cache_dir)
    for path in (layout.prefetch, layout.prefetch_part):
        path.unlink(missing_ok=True)


async def prepare_cache(
    store: ObjectStore, sb: Superblock, cache_dir: Path, limiter: trio.CapacityLimiter,
    prefetched: int = 0, head: int | None = None,
) -> Path | None:
    """Make `cache_dir/meta.db` the workspace's newest metadata.

    A cache dir that holds this workspace as of the store's newest checkpoint (or newer: work
    not yet published when the daemon died) is used as it is, and its dirty blocks are
    uploaded by the next flush. A cache dir of another workspace is refused; one that is older
    than the store (the workspace was mounted elsewhere since, and a checkpoint of the same
    number published there counts as newer) is moved aside, never deleted: returned, so its
    files the store never got come back as conflict copies (conflicts.py).
    """
    aside: Path | None = None
    layout = CacheDir(cache_dir)
    db = layout.meta_db
    if head is None:  # (else: read, and claimed, by the caller)
        head = await trio.to_thread.run_sync(ckpt.read_head, store, limiter=limiter)
    if head is None:
        raise NoWorkspaceError(
            f"{store.url} has a superblock but no checkpoint; its creation was interrupted, "
            "so create it again in an empty location"
        )
    if db.exists():
        ws, *seqs = settings_of(db, "workspace_id", "checkpoint_seq", "pending_seq",
                                "pending_created_ns")
        published, pending, pending_created = (int(v or 0) for v in seqs)
        if ws != sb.workspace_id:
            raise MountError(
                f"the cache dir {cache_dir} belongs to another workspace ({ws}); "
                "use a different --cache-dir"
            )
        ours = pending == head != published and (
            not pending_created  # recorded by no version before this one: trusted as before
            or await _ours(store, head, pending_created, limiter))
        if ours:  # it died after publishing `head`, before recording so: record it now, or
            # its flusher would publish that number again, over the one the store has
            _set_settings(db, checkpoint_seq=str(head))
        if ours or published == head or max(published, pending) > head:
            log.info("using the metadata in %s (checkpoint %d)", cache_dir,
                     max(published, pending))
            return None
        aside = layout.set_aside(int(time.time()))
        log.warning(
            "the cache dir %s is behind the store (its checkpoint %d; the store's newest, %d, "
            "was published by another mount): moving it to %s",
            cache_dir, max(published, pending), head, aside,
        )
        shutil.move(str(cache_dir), aside)
        cache_dir.mkdir(mode=0o700, parents=True)
    fetched = layout.prefetch
    use_prefetched = prefetched == head and fetched.exists()
    # What an earlier run left beside a missing database belongs to no checkpoint we know.
    for p in (*layout.of_the_metadata(), *(() if use_prefetched else (fetched,))):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if use_prefetched:
        log.info("using checkpoint %d of %s, fetched while taking the lease", head, store.url)
        fetched.replace(db)  # adopted by prefetch already
        return aside
    log.info("fetching checkpoint %d from %s", head, store.url)
    try:
        await ckpt.fetch(store, head, db, limiter)
    except Exception as e:  # (not `except*`: see _leaves)
        failures = _leaves(e)
        damage = [f for f in failures if isinstance(f, (NoSuchKey, ckpt.CorruptCheckpoint))]
        if damage:
            raise DamageError(
                f"checkpoint {head} of {store.url} is damaged ({damage[0]}); "
                f"run `wsfs fsck {store.url}` to see what is left"
            ) from None
        unreachable = [f for f in failures if isinstance(f, StoreError)]
        if unreachable:
            raise unreachable[0] from None
        raise
    _adopt(db, sb)
    return aside


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside `error`, however deeply trio's nurseries grouped them.

    Matched by hand rather than with `except*`: before Python 3.11.4 (Debian 12 ships
    3.11.2), an exception raised inside an `except*` clause comes out wrapped in an
    ExceptionGroup (CPython gh-103590), which turned the one-sentence DamageError into a
    traceback and the wrong exit code."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def _ours(store: ObjectStore, seq: int, created_ns: int,
                limiter: trio.CapacityLimiter) -> bool:
    """Whether checkpoint `seq` is the one this cache dir's flusher was publishing when it
    stopped (it records the publication's `created_ns` before it starts), not another mount's
    of the same number: one that took the workspace over after this one was fenced off or
    died, and published exactly one checkpoint. Using the cache dir then would publish that
    number again over the other mount's work."""
    manifest = await trio.to_thread.run_sync(ckpt.read_manifest, store, seq, limiter=limiter)
    return manifest.created_ns == created_ns


def settings_of(db: Path, *keys: str) -> list[str | None]:
    """Settings of the database at `db` (opened and closed for them)."""
    meta = Metadata(db)
    try:
        return [meta.get_setting(k) for k in keys]
    finally:
        meta.close()


def _set_settings(db: Path, **settings: str) -> None:
    meta = Metadata(db)
    try:
        for key, value in settings.items():
            meta.set_setting(key, value)
    finally:
        meta.close()


def _adopt(db: Path, sb: Superblock) -> None:
    """Mark a freshly fetched checkpoint as this cache dir's metadata: nothing is pending,
    and every change from now on is one the store does not have (conflicts.py)."""
    _set_settings(db, workspace_id=sb.workspace_id, clean_unmount="1",
                  published_ns=str(now_ns()))


def stopped_cleanly(cache_dir: Path) -> bool:
    """Whether the cache dir holds nothing unpublished: no metadata yet, or metadata that
    records a clean stop (or a checkpoint fetched as it is). Unreadable metadata may."""
    db = CacheDir(cache_dir).meta_db
    if not db.exists():
        return True
    try:
        (clean,) = settings_of(db, "clean_unmount")
    except Exception:
        return False
    return clean == "1"
