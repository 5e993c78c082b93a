"""`wsfs fsck STORE`: check the kept checkpoints against the store, without a mount.

By default it checks the newest checkpoint (the one the next mount would use) and the one
each named snapshot pins; `--at WHEN|NAME` checks one kept checkpoint, `--all` every kept one
(meta/retention.py). Each is fetched into a temporary directory and checked read-only, so it
is safe to run while the workspace is mounted elsewhere (objects uploaded since then, or
kept for other checkpoints, show up as unreferenced):

- the database itself (SQLite integrity_check), the root directory and the marker;
- every directory entry names an inode that exists, inside a directory that exists;
- link counts: a file's nlink is the number of entries naming it, a directory's is
  2 + its subdirectories; every linked inode is reachable from the root;
- every block in the block map has a checksum, its object (of its own, or the pack holding
  it) exists in the store, and a block of its own is no longer than its place in the file
  allows; with `verify_data`, its content matches the checksum (this downloads every
  object, each pack once).

Damage (what makes reads fail or the tree wrong) is reported per file, by path, under the
checkpoint's number and the names that pin it, and makes `wsfs fsck` exit with
`DamageError.exit_code`. Objects that no block references and inodes unlinked while open
(orphans, removed by the next mount) are garbage, not damage. With `verify_data`, an object
several checkpoints name is downloaded once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..blocks import object_key
from ..blocks import pack as packs
from ..errors import UsageError
from ..meta import checkpoint as ckpt
from ..meta import retention, schema
from ..meta.history import History, read_snapshots
from ..meta.superblock import read_superblock
from ..store import NoSuchKey, ObjectStore

log = logging.getLogger(__name__)

ROOT = 1
MARKER = b".workspace.initialized"
DATA_PREFIX = "data/"


@dataclass
class Report:
    """What fsck found; `damage` lines name the file by path."""

    store: str
    seq: int | None = None
    names: list[str] = field(default_factory=list)  # the snapshots that pin it
    damage: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inodes: int = 0
    blocks: int = 0
    block_bytes: int = 0
    verified_bytes: int = 0
    damaged_paths: set[str] = field(default_factory=set)
    garbage_objects: int = 0
    garbage_bytes: int = 0
    orphans: int = 0

    @property
    def clean(self) -> bool:
        return not self.damage

    def title(self) -> str:
        """'checkpoint 12 (snapshot "before")'."""
        pinned = ", ".join(f'"{n}"' for n in self.names)
        return f"checkpoint {self.seq}" + (f" (snapshot {pinned})" if pinned else "")

    def render(self) -> str:
        lines = [f"{self.title()} of {self.store}: {self.inodes} inodes, "
                 f"{self.blocks} blocks ({self.block_bytes} bytes in the store"
                 + (f", {self.verified_bytes} verified against their checksums" if
                    self.verified_bytes else "") + ")"]
        lines += [f"DAMAGED {d}" for d in self.damage]
        lines += [f"note: {n}" for n in self.notes]
        if self.orphans:
            lines.append(f"garbage: {self.orphans} inodes unlinked while open (orphans); the "
                         "next mount removes them")
        if self.garbage_objects:
            lines.append(f"garbage: {self.garbage_objects} unreferenced data objects "
                         f"({self.garbage_bytes} bytes): kept for other checkpoints, "
                         "uploads newer than this one, or left by an interrupted flush; they "
                         "harm nothing")
        if self.clean:
            lines.append("clean: every referenced block is in the store and the metadata is "
                         "consistent")
        else:
            lines.append(f"{len(self.damage)} problems, {len(self.damaged_paths)} damaged "
                         "files: their unreadable parts fail with EIO, everything else reads "
                         "normally")
        return "\n".join(lines)


class _Tree:
    """The checkpoint's inodes and entries, with every path of every inode."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.inodes: dict[int, tuple[int, int, int]] = {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute("SELECT id, mode, nlink, size FROM inodes")
        }
        self.entries = conn.execute("SELECT parent, name, inode FROM dentries").fetchall()
        self.children: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
        for parent, name, ino in self.entries:
            self.children[parent].append((bytes(name), ino))
        self.paths: dict[int, list[str]] = defaultdict(list)
        self.paths[ROOT].append("/")
        todo = [(ROOT, "")]
        seen = {ROOT}
        while todo:
            parent, prefix = todo.pop()
            for name, ino in self.children.get(parent, []):
                path = f"{prefix}/{os.fsdecode(name)}"
                self.paths[ino].append(path)
                mode = self.inodes.get(ino, (0, 0, 0))[0]
                if stat.S_ISDIR(mode) and ino not in seen:
                    seen.add(ino)
                    todo.append((ino, path))

    def name(self, ino: int) -> str:
        paths = self.paths.get(ino)
        return " = ".join(sorted(paths)) if paths else f"(inode {ino}, no path)"


def _check_tree(tree: _Tree, report: Report) -> None:
    inodes = tree.inodes
    root = inodes.get(ROOT)
    if root is None or not stat.S_ISDIR(root[0]):
        report.damage.append("/: the root directory is missing")
    if MARKER not in {n for n, _ in tree.children.get(ROOT, [])}:
        report.damage.append(f"/{MARKER.decode()}: the workspace marker is missing (mounts are "
                             "refused)")
    named: dict[int, int] = defaultdict(int)
    subdirs: dict[int, int] = defaultdict(int)
    for parent, name, ino in tree.entries:
        where = f"{tree.name(parent).split(' = ')[0].rstrip('/')}/{os.fsdecode(bytes(name))}"
        parent_node = inodes.get(parent)
        if parent_node is None or not stat.S_ISDIR(parent_node[0]):
            report.damage.append(f"{where}: its directory (inode {parent}) does not exist")
        if ino not in inodes:
            report.damage.append(f"{where}: dangling entry, inode {ino} does not exist")
            report.damaged_paths.add(where)
            continue
        named[ino] += 1
        if stat.S_ISDIR(inodes[ino][0]):
            subdirs[parent] += 1
    for ino, (mode, nlink, _size) in inodes.items():
        if ino == ROOT:
            expected = 2 + subdirs[ino]
        elif named[ino] == 0:
            if nlink == 0:
                report.orphans += 1
            else:
                report.damage.append(f"inode {ino}: linked ({nlink}) but no entry names it "
                                     "(lost)")
            continue
        elif stat.S_ISDIR(mode):
            if named[ino] > 1:
                report.damage.append(f"{tree.name(ino)}: a directory with {named[ino]} names")
            expected = 2 + subdirs[ino]
        else:
            expected = named[ino]
        if nlink != expected:
            report.damage.append(f"{tree.name(ino)}: link count {nlink}, should be {expected}")
        elif ino != ROOT and not tree.paths.get(ino):
            report.damage.append(f"inode {ino}: not reachable from the root directory")


# What one download of an object found (its members' checksums and its size; None: gone),
# shared by the checkpoints a run checks.
Verified = dict[str, "tuple[dict[str, str], int] | None"]


async def _check_blocks(
    store: ObjectStore, conn: sqlite3.Connection, tree: _Tree, block_size: int,
    verify_data: bool, report: Report, limiter: trio.CapacityLimiter,
    objects: dict[str, int], verified: Verified,
) -> None:
    referenced: set[str] = set()
    # (object key, is a pack) -> the blocks to verify in it: (inode, idx, block id, checksum)
    to_verify: dict[tuple[str, bool], list[tuple[int, int, str, str]]] = defaultdict(list)

    def damaged(ino: int, what: str) -> None:
        name = tree.name(ino)
        report.damage.append(f"{name}: {what}")
        report.damaged_paths.add(name)

    for ino, idx, block_id, csum, pack in conn.execute(
        "SELECT inode, idx, id, csum, pack FROM blocks ORDER BY inode, idx"
    ):
        report.blocks += 1
        key = object_key(pack or block_id)
        where = f"object {key}" if pack is None else f"pack {key}"
        node = tree.inodes.get(ino)
        if node is None or not stat.S_ISREG(node[0]):
            report.notes.append(f"block {block_id} belongs to inode {ino}, which is not a file")
            continue
        size = objects.get(key)
        if size is None:
            damaged(ino, f"block {idx} ({where}) is missing from the store")
            continue
        if key not in referenced:
            report.block_bytes += size
        referenced.add(key)
        room = min(block_size, node[2] - idx * block_size)
        if room <= 0:
            report.notes.append(f"{tree.name(ino)}: block {idx} lies past the end of the file")
        elif pack is None and size > room:
            damaged(ino, f"block {idx} ({where}) has {size} bytes, more than the "
                    f"{room} its place in the file holds")
        if csum is None:
            damaged(ino, f"block {idx} ({where}) has no checksum in the metadata")
        elif verify_data:
            to_verify[key, pack is not None].append((ino, idx, block_id, csum))
    for key, size in objects.items():
        if key not in referenced:
            report.garbage_objects += 1
            report.garbage_bytes += size

    async def verify(key: str, packed: bool, wanted: list[tuple[int, int, str, str]]) -> None:
        where = f"pack {key}" if packed else f"object {key}"

        def work() -> tuple[dict[str, str], int] | None:
            try:
                data = store.get(key)
            except NoSuchKey:
                return None
            if not packed:
                return {wanted[0][2]: hashlib.sha256(data).hexdigest()}, len(data)
            try:
                members = packs.split(data)
            except packs.PackCorrupt:
                return {}, len(data)
            return {b: c for b, (c, _) in members.items()}, len(data)

        if key not in verified:
            verified[key] = await trio.to_thread.run_sync(work, limiter=limiter)
        got = verified[key]
        for ino, idx, block_id, csum in wanted:
            if got is None:
                damaged(ino, f"block {idx} ({where}) disappeared from the store")
            elif got[0].get(block_id) != csum:
                damaged(ino, f"block {idx} ({where}) does not match its checksum (corrupt)")
        if got is not None:
            report.verified_bytes += got[1]

    async with trio.open_nursery() as nursery:
        for (key, packed), wanted in to_verify.items():
            nursery.start_soon(verify, key, packed, wanted)


# What a damaged checkpoint (as opposed to an unreachable store) raises while it is fetched.
UNREADABLE = (NoSuchKey, ckpt.CorruptCheckpoint, zlib.error, ValueError, KeyError)


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups of trio nurseries."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def check(store: ObjectStore, *, verify_data: bool = False, at: str | None = None,
                every: bool = False) -> list[Report]:
    """Check the newest checkpoint of `store` and those named snapshots pin (or the one `at`
    names, or every kept one with `every`) against the store's objects; a report each,
    newest first.

    Beside a mount, the newest checkpoint can be replaced meanwhile, and the objects only it
    named deleted once its successor is published (garbage, repacked packs): damage found in
    a checkpoint that is no longer the newest is checked again on the newest. An older
    checkpoint thinned while it is checked is left out.
    """
    limiter = trio.CapacityLimiter(16)
    sb = await trio.to_thread.run_sync(read_superblock, store)
    history = History()
    await trio.to_thread.run_sync(history.refresh, store)
    names = await trio.to_thread.run_sync(read_snapshots, store)
    pins: dict[int, list[str]] = defaultdict(list)
    for snap in sorted(names.values(), key=lambda n: n.name):
        pins[snap.seq].append(snap.name)
    head = await trio.to_thread.run_sync(ckpt.read_head, store)
    if head is None:
        return [Report(store.url, damage=["the store holds no checkpoint (meta/HEAD is "
                                          "missing)"])]
    if at is not None:
        try:
            seqs = [retention.resolve(at, history.times(),
                                      {n: s.seq for n, s in names.items()}, time.time())]
        except retention.BadWhen as e:
            raise UsageError(str(e)) from None
    elif every:
        seqs = history.kept()
    else:
        seqs = [head, *pins]
    objects: dict[str, int] = {}
    verified: Verified = {}
    reports = []
    for seq in sorted(set(seqs), reverse=True):
        report = Report(store.url, seq, pins.get(seq, []))
        if seq not in history.manifests and seq != head:  # a name pins a missing checkpoint
            report.damage.append(f"the manifest of checkpoint {seq} is missing: the "
                                 "snapshot cannot be read")
            reports.append(report)
            continue
        if not objects:
            objects.update(await trio.to_thread.run_sync(
                lambda: list(store.list(DATA_PREFIX)), limiter=limiter))
        for _ in range(ckpt.RECHECKS):
            report = await _check(store, sb.block_size, seq, verify_data, report.names, limiter,
                                  objects, verified)
            if not report.damage or seq != head:
                break
            now = await trio.to_thread.run_sync(ckpt.read_head, store)
            if now == seq or now is None:
                break
            seq = head = now  # the newest moved on: check the new newest
            objects = dict(await trio.to_thread.run_sync(
                lambda: list(store.list(DATA_PREFIX)), limiter=limiter))
            verified.clear()
        if report.damage and seq != head and await trio.to_thread.run_sync(
                store.head, ckpt.manifest_key(seq)) is None:
            continue  # thinned while it was checked: nothing is kept, nothing is damaged
        reports.append(report)
    return reports


async def _check(store: ObjectStore, block_size: int, seq: int, verify_data: bool,
                 names: list[str], limiter: trio.CapacityLimiter, objects: dict[str, int],
                 verified: Verified) -> Report:
    report = Report(store.url, seq, names)
    with tempfile.TemporaryDirectory(prefix="wsfs-fsck-") as tmp:
        db = Path(tmp) / "meta.db"
        try:
            await ckpt.fetch(store, seq, db, limiter, use_bundle=False)  # every page
        except Exception as e:
            leaf = _first_leaf(e)
            if not isinstance(leaf, UNREADABLE):
                raise leaf from None  # the store failed (a StoreError says how), or a bug
            report.damage.append(f"checkpoint {seq} cannot be read "
                                 f"({type(leaf).__name__}: {leaf}); none of it can be "
                                 "mounted")
            return report
        conn = sqlite3.connect(db)  # a temporary copy: an older format is upgraded in it
        try:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                report.damage.append(f"the metadata database is corrupt: {verdict}")
                return report
            schema.upgrade(conn)
            tree = _Tree(conn)
            report.inodes = len(tree.inodes)
            _check_tree(tree, report)
            await _check_blocks(store, conn, tree, block_size, verify_data, report, limiter,
                                objects, verified)
        finally:
            conn.close()
    return report
