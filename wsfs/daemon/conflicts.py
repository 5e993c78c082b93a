"""Conflict copies: what a cache dir set aside holds that the store never got.

A cache dir is set aside (`CACHE_DIR.stale-<time>`, workspace.prepare_cache) when the store
moved on without it: another mount took the workspace over while this one was paused, cut
off or forced out, and what this one accepted before it learned so never reached a published
checkpoint. Nothing accepted may be lost, so those files come back as copies, written under
a directory of the live workspace (`.wsfs-conflicts/<host>-<time>/` at the next mount from
that cache dir, or any directory with `wsfs recover`): each at its path, with its content,
mode and times as that mount last had them.

What changed since the cache dir's last published checkpoint is known exactly: the flusher
keeps the copy of the newest checkpoint it published (`published.db`), and an inode whose
row or block map differs from that copy's changed. A cache dir that has published nothing
yet was fetched at its mount, after which every change stamps a ctime at or after the time
recorded then (`published_ns`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

from ..blocks import pack as packs
from ..blocks.clean import open_clean_cache
from ..blocks.files import object_key
from ..blocks.journal import Journal
from ..cachedir import CacheDir
from ..meta import Metadata
from ..meta.db import NS, Inode
from ..meta.schema import MARKER, ROOT, upgrade
from ..store import NoSuchKey, ObjectStore

log = logging.getLogger(__name__)

CONFLICTS_DIR = ".wsfs-conflicts"
SINCE_SETTING = "published_ns"  # when the metadata was fetched, without a published copy

# An inode changed since the published copy: its row (the times but atime) or its blocks.
_CHANGED = """
SELECT i.id FROM inodes i WHERE i.nlink > 0 AND i.id != ? AND (
  NOT EXISTS (SELECT 1 FROM p.inodes o WHERE o.id = i.id AND o.mode = i.mode AND o.uid = i.uid
              AND o.gid = i.gid AND o.size = i.size AND o.mtime_sec = i.mtime_sec
              AND o.mtime_nsec = i.mtime_nsec AND o.ctime_sec = i.ctime_sec
              AND o.ctime_nsec = i.ctime_nsec AND o.rdev = i.rdev AND o.target IS i.target)
  OR EXISTS (SELECT 1 FROM blocks b WHERE b.inode = i.id AND NOT EXISTS (
              SELECT 1 FROM p.blocks c WHERE c.inode = b.inode AND c.idx = b.idx
              AND c.id = b.id)))
"""


def changed_inodes(cache_dir: Path, meta: Metadata) -> list[int]:
    """The inodes of `meta` (the cache dir's) that no checkpoint it published holds."""
    published = CacheDir(cache_dir).published
    if published.exists():
        conn = sqlite3.connect(published)  # a copy of ours: one of an older format is
        try:                               # upgraded in place, as meta.db was
            upgrade(conn)
        finally:
            conn.close()
        meta.conn.execute("ATTACH DATABASE ? AS p", (f"file:{published}?mode=ro",))
        try:
            return [int(r[0]) for r in meta.conn.execute(_CHANGED, (ROOT,))]
        finally:
            meta.conn.execute("DETACH DATABASE p")
    since = int(meta.get_setting(SINCE_SETTING) or 0)  # none recorded: everything
    return [int(r[0]) for r in meta.conn.execute(
        "SELECT id FROM inodes WHERE nlink > 0 AND id != ? AND (ctime_sec, ctime_nsec) >= (?, ?)",
        (ROOT, *divmod(since, NS)))]


def _paths(meta: Metadata, ino: int) -> list[bytes]:
    """Every path (relative, '/'-separated) that names `ino`: one per hard link."""
    out = []
    for parent, name in meta.conn.execute(
            "SELECT parent, name FROM dentries WHERE inode = ?", (ino,)).fetchall():
        parts = [bytes(name)]
        seen = {ino}
        while parent != ROOT:
            row = meta.conn.execute(
                "SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (parent,)).fetchone()
            if row is None or parent in seen:
                break  # not reachable from the root: an unlinked directory's leftovers
            seen.add(parent)
            parts.append(bytes(row[1]))
            parent = row[0]
        else:
            out.append(b"/".join(reversed(parts)))
    return out


class _Blocks:
    """Reads a set-aside cache dir's blocks: its dirty files, its clean cache, the store."""

    def __init__(self, cache_dir: Path, store: ObjectStore | None, meta: Metadata) -> None:
        layout = CacheDir(cache_dir)
        self.dirty = layout.dirty
        self.store = store
        self.meta = meta
        self.clean = None
        if layout.clean.is_dir():
            try:
                self.clean = open_clean_cache(layout.clean, 1 << 40)
            except Exception as e:  # a damaged cache: the store has those blocks
                log.warning("cannot read the clean cache of %s: %s", cache_dir, e)
        self.packs: dict[str, dict[str, tuple[str, bytes]]] = {}

    def read(self, block_id: str, pack: str | None) -> bytes:
        try:
            return (self.dirty / block_id).read_bytes()
        except FileNotFoundError:
            pass
        if self.clean is not None:
            f = self.clean.get(block_id, default=None, read=True)
            if isinstance(f, bytes):
                return f
            if f is not None:
                with f:
                    return bytes(f.read())
        if self.store is None:
            raise NoSuchKey(block_id)
        if pack is None:
            return self.store.get(object_key(block_id))
        if pack not in self.packs:
            self.packs = {pack: packs.split(self.store.get(object_key(pack)))}
        return self.packs[pack][block_id][1]

    def close(self) -> None:
        if self.clean is not None:
            self.clean.close()


def export(cache_dir: Path, store: ObjectStore | None, block_size: int, into: Path) -> int:
    """Write the files of `cache_dir` that the store never got under `into` (blocking);
    return how many paths were written. `store` (None: none at hand) serves the blocks
    that were uploaded but never published; a block found nowhere reads as zeros, loudly."""
    layout = CacheDir(cache_dir)
    meta = Metadata(layout.meta_db)
    blocks = None
    try:
        if layout.journal.exists():  # a machine crash: the journal holds acknowledged bytes
            j = Journal(layout.journal)
            try:
                j.replay(layout.dirty, meta.awaits_upload)
            finally:
                j.close()
        blocks = _Blocks(cache_dir, store, meta)
        nodes: list[tuple[bytes, Inode]] = []
        marker = meta.lookup(ROOT, MARKER)
        for ino in changed_inodes(cache_dir, meta):
            node = meta.get_inode(ino)
            if node is not None and ino != marker:
                nodes.extend((path, node) for path in _paths(meta, ino))
        if not nodes:
            return 0
        into.mkdir(parents=True, exist_ok=True)
        dirs: list[tuple[Path, Inode]] = []
        for path, node in sorted(nodes, key=lambda pn: pn[0]):
            target = into / os.fsdecode(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISDIR(node.mode):
                target.mkdir(exist_ok=True)
                dirs.append((target, node))
                continue
            _write_node(target, node, meta, blocks, block_size)
        for target, node in sorted(dirs, key=lambda tn: -len(tn[0].parts)):
            os.chmod(target, stat.S_IMODE(node.mode))
            os.utime(target, ns=(node.atime_ns, node.mtime_ns))
        return len(nodes)
    finally:
        if blocks is not None:
            blocks.close()
        meta.close()


def _write_node(target: Path, node: Inode, meta: Metadata, blocks: _Blocks,
                block_size: int) -> None:
    if stat.S_ISLNK(node.mode):
        os.symlink(node.target or b"", target)
        os.utime(target, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)
        return
    if not stat.S_ISREG(node.mode):
        try:
            os.mknod(target, node.mode, node.rdev)
        except OSError as e:
            log.warning("cannot recreate the special file %s: %s", target, e)
            return
    else:
        with open(target, "wb") as f:
            count = -(-node.size // block_size)
            for idx, ref in sorted(meta.blocks_in(node.id, 0, max(count - 1, 0)).items()):
                try:
                    data = blocks.read(ref.id, ref.pack)
                except (NoSuchKey, KeyError, packs.PackCorrupt, OSError) as e:
                    log.error("block %d of %s is nowhere to be found (%s): it reads as zeros",
                              idx, target, e)
                    continue
                f.seek(idx * block_size)
                f.write(data[: max(0, min(block_size, node.size - idx * block_size))])
            f.truncate(node.size)
    os.chmod(target, stat.S_IMODE(node.mode))
    os.utime(target, ns=(node.atime_ns, node.mtime_ns))


def conflicts_name(host: str, when: float) -> str:
    """`<host>-<UTC time>`: the directory under `.wsfs-conflicts/` of one export."""
    return f"{host}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(when))}"
