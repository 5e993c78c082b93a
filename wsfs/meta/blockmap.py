"""The block map, packs and garbage: which block holds each part of a file, where in the store
it lives, and which objects the store may delete.

Half of `Metadata` (db.py), which inherits it: the statements on the tables `blocks`, `packs`,
`objects` and `garbage` (schema.py), apart from the inodes and directory entries because they
are what the sync layer (uploads, the repacker, retention) works on, and the fs layer only
through a file's blocks. They share db.py's connection, transaction and caches: the block
counts by inode live here, and db.py forgets them with its other caches on a rollback.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

CACHE_MAX = 16384  # entries per cache (inode rows in db.py, block counts here); a full one
# starts over
_BLOCK_COUNT = "SELECT count(*) FROM blocks WHERE inode=?"


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Where one block of a file lives: its id, its checksum once uploaded, and the pack
    holding it if it was uploaded in one."""

    idx: int
    id: str
    csum: str | None
    pack: str | None


class BlockMap:
    """The statements on the block map, packs and garbage (see the module docstring)."""

    # Metadata's (db.py): its connection, its cache of stored blocks by inode, and whether
    # the group transaction wrote (what a rollback by SQLite itself must undo).
    conn: sqlite3.Connection
    _nblocks: dict[int, int]
    _wrote: bool

    def _check_caches(self) -> bool:
        raise NotImplementedError  # Metadata's: forget the caches after SQLite's own rollback

    def get_setting(self, key: str) -> str | None:
        raise NotImplementedError  # Metadata's

    # -- block map --------------------------------------------------------------------------

    def get_block(self, ino: int, idx: int) -> BlockRef | None:
        row = self.conn.execute(
            "SELECT idx, id, csum, pack FROM blocks WHERE inode=? AND idx=?", (ino, idx)
        ).fetchone()
        return None if row is None else BlockRef(*row)

    def blocks_in(self, ino: int, first: int, last: int) -> dict[int, BlockRef]:
        """The blocks of `ino` with first <= idx <= last, by index (holes are absent)."""
        return {
            r[0]: BlockRef(*r)
            for r in self.conn.execute(
                "SELECT idx, id, csum, pack FROM blocks WHERE inode=? AND idx BETWEEN ? AND ?",
                (ino, first, last),
            )
        }

    def blocks_to_upload(self, ino: int) -> list[str]:
        """The blocks of `ino` that the store does not hold yet (no checksum): the only ones
        an fsync(2) must make durable on the cache disk. The file's block map is scanned in
        SQLite, not in Python: with a BlockRef built per block, an fsync of a 1 GiB file
        spent ~3 ms listing its 1,024 blocks."""
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM blocks WHERE inode=? AND csum IS NULL", (ino,))]

    def set_block(self, ino: int, idx: int, block_id: str) -> None:
        """Map a new (dirty, never uploaded) block into a file, replacing what was there."""
        self._blocks_changed(ino)
        self.conn.execute(
            "INSERT OR REPLACE INTO blocks (inode, idx, id) VALUES (?,?,?)", (ino, idx, block_id)
        )

    def remove_blocks_from(self, ino: int, first: int) -> list[BlockRef]:
        """Remove the blocks of `ino` with idx >= first; return what was removed."""
        self._blocks_changed(ino)
        refs = [
            BlockRef(*r)
            for r in self.conn.execute(
                "SELECT idx, id, csum, pack FROM blocks WHERE inode=? AND idx>=?", (ino, first)
            )
        ]
        self.conn.execute("DELETE FROM blocks WHERE inode=? AND idx>=?", (ino, first))
        return refs

    def remove_blocks_in(self, ino: int, first: int, last: int) -> list[BlockRef]:
        """Remove the blocks of `ino` with first <= idx <= last; return what was removed."""
        refs = list(self.blocks_in(ino, first, last).values())
        if refs:
            self._blocks_changed(ino)
            self.conn.execute("DELETE FROM blocks WHERE inode=? AND idx BETWEEN ? AND ?",
                              (ino, first, last))
        return refs

    def next_block(self, ino: int, idx: int) -> int | None:
        """The first index >= idx that holds a block of `ino` (None: only holes from there)."""
        row = self.conn.execute(
            "SELECT MIN(idx) FROM blocks WHERE inode=? AND idx>=?", (ino, idx)).fetchone()
        return None if row[0] is None else int(row[0])

    def next_hole(self, ino: int, idx: int) -> int:
        """The first index >= idx that holds no block of `ino` (a file ends in holes). One
        walk of the primary key, however many blocks come before the hole."""
        if self.get_block(ino, idx) is None:
            return idx
        row = self.conn.execute(
            "SELECT b.idx + 1 FROM blocks b WHERE b.inode=? AND b.idx>=? AND NOT EXISTS"
            " (SELECT 1 FROM blocks c WHERE c.inode=b.inode AND c.idx=b.idx + 1)"
            " ORDER BY b.idx LIMIT 1", (ino, idx)).fetchone()
        return int(row[0])

    def blocks_without_checksum(self) -> list[tuple[int, int, str]]:
        """(inode, idx, id) of every block never recorded as uploaded (recovery checks them)."""
        return [(int(r[0]), int(r[1]), str(r[2])) for r in self.conn.execute(
            "SELECT inode, idx, id FROM blocks WHERE csum IS NULL")]

    def remove_block(self, ino: int, idx: int) -> None:
        self._blocks_changed(ino)
        self.conn.execute("DELETE FROM blocks WHERE inode=? AND idx=?", (ino, idx))

    def small_file_blocks(self, parent: int, max_size: int, limit: int) -> list[BlockRef]:
        """The first block of up to `limit` regular files of at most `max_size` bytes in
        directory `parent`: what a prefetch of the directory fetches."""
        return [BlockRef(*r) for r in self.conn.execute(
            "SELECT 0, b.id, b.csum, b.pack FROM dentries d JOIN inodes i ON i.id = d.inode"
            " JOIN blocks b ON b.inode = d.inode AND b.idx = 0"
            " WHERE d.parent=? AND i.size<=? AND (i.mode & 61440) = 32768 LIMIT ?",
            (parent, max_size, limit))]

    def block_count(self, ino: int) -> int:
        self._check_caches()
        count = self._nblocks.get(ino)
        if count is None:
            count = int(self.conn.execute(_BLOCK_COUNT, (ino,)).fetchone()[0])
            self._count_is(ino, count)
        return count

    def _blocks_changed(self, ino: int) -> None:
        """Forget `ino`'s cached block count; `_wrote`: a group that SQLite rolls back must
        forget every count it changed too."""
        self._nblocks.pop(ino, None)
        self._wrote = True

    def _count_is(self, ino: int, count: int) -> None:
        if len(self._nblocks) >= CACHE_MAX:
            self._nblocks.clear()
        self._nblocks[ino] = count

    def set_uploaded(self, csums: dict[str, str], pack: str | None = None,
                     pack_size: int | None = None) -> None:
        """Record blocks as uploaded: their checksums, and the pack they went up in (holding
        `pack_size` bytes of block data, for the repacker); and each new object's birth."""
        born = self.next_checkpoint()
        named: list[str] = []
        for block_id, csum in csums.items():
            if self.conn.execute("UPDATE blocks SET csum=?, pack=? WHERE id=? AND csum IS NULL",
                                 (csum, pack, block_id)).rowcount and pack is None:
                named.append(block_id)  # (one deleted meanwhile is garbage already)
        if pack is not None:
            named.append(pack)  # (the caller makes it garbage if no member is left)
            self.set_pack_size(pack, pack_size)
        self.conn.executemany("INSERT OR IGNORE INTO objects (id, born) VALUES (?, ?)",
                              [(o, born) for o in named])

    def next_checkpoint(self) -> int:
        """The number after the newest checkpoint published from this database: no
        checkpoint published before now has a lower one (retention.py's `born`)."""
        return int(self.get_setting("checkpoint_seq") or 0) + 1

    def set_pack_size(self, pack: str, size: int | None) -> None:
        self.conn.execute("INSERT OR REPLACE INTO packs (id, size) VALUES (?, ?)", (pack, size))

    def pack_members(self, pack: str) -> list[tuple[str, str]]:
        """(block id, checksum) of every block living in `pack`."""
        return [(str(r[0]), str(r[1])) for r in self.conn.execute(
            "SELECT id, csum FROM blocks WHERE pack=? AND csum IS NOT NULL", (pack,))]

    def move_to_pack(self, moves: list[tuple[str, str, str]], pack: str) -> int:
        """Repoint blocks (id, old pack, checksum) at `pack`, a new copy of them; only those
        still in their old pack with that content move. Returns how many moved."""
        moved = 0
        for block_id, old, csum in moves:
            moved += self.conn.execute(
                "UPDATE blocks SET pack=? WHERE pack=? AND id=? AND csum=?",
                (pack, old, block_id, csum)).rowcount
        if moved:
            self.conn.execute("INSERT OR IGNORE INTO objects (id, born) VALUES (?, ?)",
                              (pack, self.next_checkpoint()))
        return moved

    def pack_in_use(self, pack: str) -> bool:
        """Whether any block still lives in `pack` (else the pack is garbage)."""
        return self.conn.execute(
            "SELECT 1 FROM blocks WHERE pack=? LIMIT 1", (pack,)).fetchone() is not None

    def awaits_upload(self, block_id: str) -> bool:
        """Whether the block map still names `block_id` without a checksum (else it was
        uploaded, or nothing references it any more)."""
        return self.conn.execute(
            "SELECT 1 FROM blocks WHERE id=? AND csum IS NULL LIMIT 1", (block_id,)
        ).fetchone() is not None

    # -- garbage ----------------------------------------------------------------------------

    def add_garbage_of(self, refs: Iterable[BlockRef]) -> None:
        """Record the objects the dropped blocks `refs` leave unreferenced (call after their
        rows are gone): a single block's own object, a pack once no block lives in it.

        A block without a checksum whose object the store may hold is in the upload of the
        running flush cycle: no checkpoint before the next one names it (its birth)."""
        ids = {r.id for r in refs if r.pack is None}
        ids |= {r.pack for r in refs if r.pack is not None and not self.pack_in_use(r.pack)}
        if ids:
            uploading = {r.id for r in refs if r.pack is None and r.csum is None}
            born = self.next_checkpoint() if uploading else 0
            self.add_garbage(sorted(ids), dict.fromkeys(uploading, born))

    def add_garbage(self, ids: list[str], born: dict[str, int] | None = None) -> None:
        """Objects leave the tree: each goes into `garbage` with its birth (its `objects`
        row's, else `born`'s, else unknown), and its rows in `objects` and `packs` go."""
        known = born or {}
        rows = []
        for object_id in ids:
            row = self.conn.execute("SELECT born FROM objects WHERE id=?",
                                    (object_id,)).fetchone()
            rows.append((object_id, row[0] if row else known.get(object_id)))
        self.conn.executemany(
            "INSERT OR IGNORE INTO garbage (id, born) VALUES (?, ?)", rows
        )
        self.conn.executemany("DELETE FROM objects WHERE id=?", [(i,) for i in ids])
        self.conn.executemany("DELETE FROM packs WHERE id=?", [(i,) for i in ids])

    def mark_dead(self, ids: Iterable[str], died: int) -> None:
        """Close the run of checkpoints that may name these garbage objects at `died` (the
        number before the first published checkpoint without them)."""
        self.conn.executemany("UPDATE garbage SET died=? WHERE id=? AND died IS NULL",
                              [(died, i) for i in ids])

    def remove_garbage(self, ids: list[str]) -> None:
        self.conn.executemany("DELETE FROM garbage WHERE id=?", [(i,) for i in ids])
