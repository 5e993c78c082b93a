"""Pack usage: what the block map says about each pack in use, its size and its live bytes.

The repacker (sync/repack.py) chooses from it which packs to rewrite, and `wsfs du` reports it;
both ask the same questions of the same tables, so the queries live here, beside the schema.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .db import connect


@dataclass(frozen=True, slots=True)
class PackUsage:
    """What the block map says about one pack in use."""

    id: str
    size: int | None  # bytes of block data it was uploaded with (None: unknown)
    members: int  # live member blocks
    live: int  # their bytes (an estimate that is never below the truth)

    @property
    def dead(self) -> int:
        return 0 if self.size is None else max(0, self.size - self.live)


_LIVE = "sum(max(0, min(?1, i.size - b.idx * ?1)))"  # the members' bytes (estimated)
_USAGE = (
    f"SELECT b.pack, p.size, count(*), {_LIVE}"
    " FROM blocks b JOIN inodes i ON i.id = b.inode LEFT JOIN packs p ON p.id = b.pack"
    " WHERE b.pack IS NOT NULL GROUP BY b.pack"
)
_ADOPT = (
    f"INSERT INTO packs (id, size) SELECT b.pack, {_LIVE}"
    " FROM blocks b JOIN inodes i ON i.id = b.inode WHERE b.pack = ?2 GROUP BY b.pack"
)


def pack_usage(conn: sqlite3.Connection, block_size: int) -> list[PackUsage]:
    """Every pack some block lives in, with its size and live bytes (blocking: one pass
    over the packed blocks, through the blocks_by_pack index).

    A block's content is never longer than its place in the file (a cut block is copied
    short), so the live bytes are at most what the members really hold, exactly that for
    files written the usual way.
    """
    return [PackUsage(str(r[0]), None if r[1] is None else int(r[1]), int(r[2]),
                      int(r[3] or 0)) for r in conn.execute(_USAGE, (block_size,))]


def adopt_packs(conn: sqlite3.Connection, block_size: int) -> int:
    """Give a row to every pack in use that lacks one; return how many (blocking).

    Only the packs of a checkpoint's own flush cycle lack one (their rows were written after
    its snapshot was pinned), and they have lost nothing since, so their live bytes are their
    size. True only until the mount changes something: called before it serves. One pass
    over the blocks_by_pack index; the sizes of the few found cost a query each.
    """
    rowless = [str(r[0]) for r in conn.execute(
        "SELECT DISTINCT pack FROM blocks WHERE pack IS NOT NULL"
        " AND pack NOT IN (SELECT id FROM packs)")]
    for pack_id in rowless:
        conn.execute(_ADOPT, (block_size, pack_id))
    return len(rowless)


def scan(db_path: Path, block_size: int) -> list[PackUsage]:
    """`pack_usage` of the committed state of a live database, on a connection of its own
    (blocking; runs in a worker thread while the trio thread keeps writing)."""
    conn = connect(db_path)
    try:
        return pack_usage(conn, block_size)
    finally:
        conn.close()
