"""What changed between two checkpoints of one workspace, for a read-only view that moves
from the older to the newer (fs/views.py): the kernel must forget exactly what differs.

Inode and dentry ids are never reused (schema.py: AUTOINCREMENT), and a block's id names one
content for good (a checkpoint holds only uploaded, immutable blocks), so comparing rows is
comparing contents: an inode changed if its row, the ids of its blocks or its xattrs differ.
A block that only moved to another pack (repack.py) is no change.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .db import Metadata
from .schema import TIMES

_INODE_COLUMNS = ", ".join(
    ["id", "mode", "uid", "gid", "size", "nlink", "rdev"]
    + [f"{t}_{u}" for t in TIMES for u in ("sec", "nsec")] + ["target"])


def _both_ways(columns: str, table: str, key: str) -> str:
    """The `key` of every row of `table` that one side has and the other has not."""
    return (f"SELECT {key} FROM (SELECT {columns} FROM old.{table} EXCEPT "
            f"SELECT {columns} FROM main.{table}) UNION "
            f"SELECT {key} FROM (SELECT {columns} FROM main.{table} EXCEPT "
            f"SELECT {columns} FROM old.{table})")


_CHANGED_INODES = " UNION ".join([
    f"SELECT id FROM (SELECT {_INODE_COLUMNS} FROM old.inodes EXCEPT "
    f"SELECT {_INODE_COLUMNS} FROM main.inodes)",
    _both_ways("inode, idx, id", "blocks", "inode"),
    _both_ways("inode, name, value", "xattrs", "inode"),
])
_CHANGED_ENTRIES = _both_ways("parent, name, inode", "dentries", "parent, name")


@dataclass(frozen=True, slots=True)
class Changes:
    """What differs from an older checkpoint to a newer one."""

    # inodes whose attributes, contents or xattrs differ, or that are gone (one that only
    # the newer has may be listed too: nobody can have cached it)
    inodes: frozenset[int]
    # (parent, name) of every entry that names another inode, or none, on one side
    entries: frozenset[tuple[int, bytes]]


def changes(old: Path, new: Path) -> Changes:
    """Compare two checkpoint databases (blocking: whole tables, in SQLite's C)."""
    conn = sqlite3.connect(new)
    try:
        conn.execute("ATTACH DATABASE ? AS old", (str(old),))
        inodes = frozenset(int(r[0]) for r in conn.execute(_CHANGED_INODES))
        entries = frozenset((int(p), bytes(n)) for p, n in conn.execute(_CHANGED_ENTRIES))
    finally:
        conn.close()
    return Changes(inodes, entries)


def inode_differs(a: Metadata, b: Metadata, ino: int) -> bool:
    """Whether inode `ino` has other attributes, contents or xattrs in `a` than in `b`."""
    if a.get_inode(ino) != b.get_inode(ino):
        return True
    last = 1 << 62
    if ({i: r.id for i, r in a.blocks_in(ino, 0, last).items()}
            != {i: r.id for i, r in b.blocks_in(ino, 0, last).items()}):
        return True
    names = a.list_xattrs(ino)
    return (sorted(names) != sorted(b.list_xattrs(ino))
            or any(a.get_xattr(ino, n) != b.get_xattr(ino, n) for n in names))
