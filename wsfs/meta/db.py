"""Typed access to the live metadata database (`meta.db`): `Metadata`.

Its statements on inodes, directory entries and extended attributes are here, those on the
block map, packs and garbage in blockmap.py, its transactions in commits.py (Metadata
inherits both).

SQLite is called synchronously from the trio thread, between awaits: each call is a few
microseconds, and running every statement in the one thread that runs the FUSE handlers makes
each handler atomic without locks (S3QL does the same). The database runs in WAL mode with
`synchronous=NORMAL`: a commit survives a crash of the daemon (it is in the OS page cache), and
`sync()` makes it survive a crash of the machine, which is what fsync(2) promises.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .blockmap import CACHE_MAX, BlockMap, BlockRef
from .commits import CommitHooks, GroupCommit
from .schema import FORMAT_VERSION, TIMES, create_schema, upgrade


@dataclass(slots=True)
class Inode:
    """One row of the inodes table (see schema.py for the meaning of each field), each
    timestamp in nanoseconds since the epoch (a Python int: any size)."""

    id: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: bytes | None


NS = 1_000_000_000
_TIME_COLUMNS = ", ".join(f"{t}_sec, {t}_nsec" for t in TIMES)
_SET_TIMES = ", ".join(f"{t}_sec=?, {t}_nsec=?" for t in TIMES)
# Seconds within which seconds * 10**9 + nanoseconds fits in SQLite's 64-bit integers
# (1677-09-21 to 2262-04-11): SQLite joins those, Python the rest (a float in SQLite).
_JOINABLE = 9_223_372_035


def _inode_columns(p: str) -> str:
    """The columns of an InodeRow, each time in nanoseconds where SQLite can say it, else
    NULL (`_exact` joins those in Python), from table alias `p`: a row is built in C."""
    times = ", ".join(f"CASE WHEN {p}{t}_sec BETWEEN -{_JOINABLE} AND {_JOINABLE}"
                      f" THEN {p}{t}_sec * {NS} + {p}{t}_nsec END" for t in TIMES)
    return f"{p}id, {p}mode, {p}uid, {p}gid, {p}size, {p}nlink, {p}rdev, {times}, {p}target"


INODE_CACHE_MAX = CACHE_MAX  # cached inode rows (~300 bytes each); a full cache starts over
_I_COLUMNS = _inode_columns("i.")
_GET_INODE = f"SELECT {_inode_columns('')} FROM inodes WHERE id=?"
_GET_TIMES = f"SELECT {_TIME_COLUMNS} FROM inodes WHERE id=?"
_IN_LIST_MAX = 500  # ids per "IN (...)" statement: far below SQLite's limit on parameters
InodeRow = tuple[int, int, int, int, int, int, int, int, int, int, bytes | None]  # times in ns


def connect(path: Path) -> sqlite3.Connection:
    """Open a metadata database with the settings every connection must use."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB of page cache
    return conn


class Metadata(GroupCommit, BlockMap):
    """The filesystem's metadata: inodes, directory entries, xattrs, and (BlockMap) the
    block map, packs and garbage, in transactions that commit as a group (GroupCommit)."""

    def __init__(self, path: Path, hooks: CommitHooks | None = None) -> None:
        """`hooks`: told of every commit, rollback and sync (a database opened only to read
        or to copy has none)."""
        self.path = path
        self.hooks = hooks
        fresh = not path.exists()
        self.conn = connect(path)
        if fresh:
            create_schema(self.conn)
        upgrade(self.conn)
        fmt = int(self.get_setting("format") or 0)
        if fmt != FORMAT_VERSION:
            raise ValueError(f"metadata format {fmt} is not {FORMAT_VERSION}")
        # Databases created before this index existed (schema.py) get it on open.
        self.conn.execute("CREATE INDEX IF NOT EXISTS dentries_by_parent ON dentries (parent)")
        self.conn.isolation_level = "DEFERRED"  # writes open a transaction; flush() commits
        # Changes that only moved an inode's timestamps: fdatasync(2) need not sync those.
        self.time_changes = 0
        # Commits made, and how many of them a finished `sync` has made durable: the block
        # layer deletes a block's file only once the commit that let it go is durable.
        self.commits = 0
        self.synced_commits = 0
        self._sync_failed = False
        # Inode rows by id, written through by every change: the handlers read the same few
        # inodes (a file, its directory) over and over, and a dict beats a statement 5 to 1.
        # Valid only as long as SQLite keeps what we wrote: `rollback()` clears it, and so
        # does any read that finds the group transaction gone (SQLite rolls a whole
        # transaction back by itself on a full disk or an I/O error).
        self._inodes: dict[int, InodeRow] = {}
        self._wrote = False  # changed inodes or entries since the last commit (_check_caches)
        # Inodes that may have xattrs (a superset): most requests ask about files that have
        # none (security.capability at every write, ACLs at every `ls -l`), answered here.
        self._xattr_inodes: set[int] = set()
        # parent_of answers (every listing asks for ".."); emptied whenever a name goes away.
        self._parents: dict[int, int] = {}
        # Stored blocks by inode (st_blocks of every attribute reply: a setattr, of which the
        # kernel sends several per small file, cost a count query each). An entry goes with
        # any change to that inode's block map, all of them with any rollback.
        self._nblocks: dict[int, int] = {}
        # Grows with every change to any directory entry and every rollback: lets the fs
        # layer trust that a listing it finished is still complete.
        self.dentry_changes = 0
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Forget what the caches hold: after a rollback they may say what SQLite no longer
        does (a deleted inode's xattrs, say, came back)."""
        self._inodes.clear()
        self._parents.clear()
        self._nblocks.clear()
        self.dentry_changes += 1  # an entry may have come back
        self._wrote = False
        self._xattr_inodes = {
            int(r[0]) for r in self.conn.execute("SELECT DISTINCT inode FROM xattrs")
        }

    def _rolled_back(self) -> bool:
        """After a savepoint's rollback: forget what the caches may say that SQLite no
        longer does. Returns whether SQLite rolled the whole group back (`_check_caches`)."""
        self._inodes.clear()
        self._parents.clear()
        self._nblocks.clear()
        self.dentry_changes += 1
        if self._check_caches():
            return True
        self._xattr_inodes.update(
            int(r[0]) for r in self.conn.execute("SELECT DISTINCT inode FROM xattrs"))
        return False

    def _check_caches(self) -> bool:
        """Reset the caches if SQLite rolled the group transaction back by itself (a full
        disk or an I/O error does that): we wrote, and no transaction is open any more.
        Returns whether it did."""
        if self._wrote and not self.conn.in_transaction:
            self._reset_caches()
            self._after_rollback()
            return True
        return False

    # -- settings ---------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value)
        )

    # -- inodes -----------------------------------------------------------------------------

    def _cached(self, ino: int) -> InodeRow | None:
        """The row of inode `ino`, from the cache when it is there (see __init__)."""
        self._check_caches()
        row = self._inodes.get(ino)
        if row is None:
            row = self.conn.execute(_GET_INODE, (ino,)).fetchone()
            if row is not None:
                row = self._exact(row)
                self._remember(row)
        return row

    def _exact(self, row: Any) -> InodeRow:
        """An inode row as read, with the times SQLite could not join (NULL) joined here."""
        if row[7] is None or row[8] is None or row[9] is None:
            a_s, a_n, m_s, m_n, c_s, c_n = self.conn.execute(_GET_TIMES, (row[0],)).fetchone()
            return (*row[:7], a_s * NS + a_n, m_s * NS + m_n, c_s * NS + c_n, row[10])
        return row  # type: ignore[no-any-return]

    def _remember(self, row: InodeRow) -> None:
        if len(self._inodes) >= INODE_CACHE_MAX:
            self._inodes.clear()
        self._inodes[row[0]] = row

    def get_inode(self, ino: int) -> Inode | None:
        """A fresh copy of inode `ino`: callers change it, then `save_inode` it."""
        row = self._cached(ino)
        return None if row is None else Inode(*row)

    def get_inode_blocks(self, ino: int) -> tuple[Inode, int] | None:
        """An inode with the number of its stored blocks (for st_blocks; only a regular
        file with data has any, so only that costs a statement)."""
        row = self._cached(ino)
        if row is None:
            return None
        node = Inode(*row)
        return node, self.block_count(ino) if node.size and node.mode & 0o170000 == 0o100000 else 0

    # lookup is the hottest request after getattr: one statement, block count included.
    _LOOKUP = (
        f"SELECT {_I_COLUMNS}, (SELECT count(*) FROM blocks b WHERE b.inode = i.id)"
        " FROM dentries d JOIN inodes i ON i.id = d.inode WHERE d.parent=? AND d.name=?"
    )
    _LOOKUP_NODE = (
        f"SELECT {_I_COLUMNS} FROM dentries d JOIN inodes i ON i.id = d.inode"
        " WHERE d.parent=? AND d.name=?"
    )

    def lookup_inode(self, parent: int, name: bytes) -> tuple[Inode, int] | None:
        """The inode `name` names in `parent`, with the number of its stored blocks."""
        row = self.conn.execute(self._LOOKUP, (parent, name)).fetchone()
        if row is None:
            return None
        self._check_caches()
        node = self._exact(row[:-1])
        self._remember(node)
        self._count_is(row[0], int(row[-1]))
        return Inode(*node), int(row[-1])

    def lookup_node(self, parent: int, name: bytes) -> Inode | None:
        """The inode `name` names in `parent`, in one statement (for unlink and rmdir)."""
        row = self.conn.execute(self._LOOKUP_NODE, (parent, name)).fetchone()
        if row is None:
            return None
        self._check_caches()
        node = self._exact(row)
        self._remember(node)  # the caller saves it next: a cached row makes that one UPDATE
        return Inode(*node)

    def create_inode(
        self,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        *,
        nlink: int = 1,
        rdev: int = 0,
        size: int = 0,
        target: bytes | None = None,
        ino: int | None = None,
    ) -> Inode:
        sec, nsec = divmod(now_ns, NS)
        cur = self.conn.execute(
            f"INSERT INTO inodes (id, mode, uid, gid, size, nlink, rdev, {_TIME_COLUMNS}, target)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (ino, mode, uid, gid, size, nlink, rdev, sec, nsec, sec, nsec, sec, nsec, target),
        )
        assert cur.lastrowid is not None
        row = (cur.lastrowid, mode, uid, gid, size, nlink, rdev, now_ns, now_ns, now_ns, target)
        self._wrote = True
        self._remember(row)
        self._count_is(cur.lastrowid, 0)
        return Inode(*row)

    def save_inode(self, node: Inode) -> None:
        """Write every field of `node` back (callers change the dataclass, then save it)."""
        old = self._inodes.get(node.id)  # the cache tells a change beyond timestamps apart
        times = (*divmod(node.atime_ns, NS), *divmod(node.mtime_ns, NS),
                 *divmod(node.ctime_ns, NS))
        if old is not None and old[1:7] != (node.mode, node.uid, node.gid, node.size,
                                            node.nlink, node.rdev):
            rowcount = 0  # skip the timestamps-only statement: it would match no row
        else:
            cur = self.conn.execute(  # the common case, counted apart: only timestamps moved
                f"UPDATE inodes SET {_SET_TIMES} WHERE id=? AND mode=? AND uid=? AND gid=?"
                " AND size=? AND nlink=? AND rdev=?",
                (*times, node.id, node.mode, node.uid, node.gid, node.size, node.nlink,
                 node.rdev),
            )
            rowcount = cur.rowcount
        if rowcount:
            self.time_changes += rowcount
        else:
            self.conn.execute(
                f"UPDATE inodes SET mode=?, uid=?, gid=?, size=?, nlink=?, rdev=?, {_SET_TIMES}"
                " WHERE id=?",
                (node.mode, node.uid, node.gid, node.size, node.nlink, node.rdev, *times,
                 node.id),
            )
        self._wrote = True
        self._remember((node.id, node.mode, node.uid, node.gid, node.size, node.nlink, node.rdev,
                        node.atime_ns, node.mtime_ns, node.ctime_ns, node.target))

    def delete_inodes(self, inos: Sequence[int]) -> list[BlockRef]:
        """Delete inodes with their xattrs and block maps; return their blocks. A few
        statements for many inodes (the batches of rm -r), not a few per inode."""
        refs: list[BlockRef] = []
        for start in range(0, len(inos), _IN_LIST_MAX):
            chunk = list(inos[start : start + _IN_LIST_MAX])
            marks = ",".join("?" * len(chunk))
            refs += [BlockRef(*r) for r in self.conn.execute(
                f"DELETE FROM blocks WHERE inode IN ({marks}) RETURNING idx, id, csum, pack",
                chunk)]
            with_xattrs = [ino for ino in chunk if ino in self._xattr_inodes]
            if with_xattrs:
                self.conn.execute(
                    f"DELETE FROM xattrs WHERE inode IN ({','.join('?' * len(with_xattrs))})",
                    with_xattrs)
                self._xattr_inodes.difference_update(with_xattrs)
            self.conn.execute(f"DELETE FROM inodes WHERE id IN ({marks})", chunk)
            for ino in chunk:
                self._inodes.pop(ino, None)
                self._nblocks.pop(ino, None)
        self._wrote = True
        return refs

    def orphans(self) -> list[int]:
        """Inodes no directory entry names (unlinked while open when the daemon stopped)."""
        return [r[0] for r in self.conn.execute("SELECT id FROM inodes WHERE nlink=0")]

    def counts(self) -> tuple[int, int, int]:
        """(inodes, total bytes of file sizes, stored blocks): for statfs (full scans: cache).

        The sizes are summed with total(), a float, never sum(): two sparse files of the
        largest size (2^63 - 1) overflow SQLite's integers, sum() fails, and so did df. The
        total is exact to 2^53 bytes (8 PiB), past what statfs reports anyway."""
        row = self.conn.execute(
            "SELECT count(*), total(size), (SELECT count(*) FROM blocks) FROM inodes"
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    # -- directory entries ------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.conn.execute(
            "SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return None if row is None else int(row[0])

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.dentry_changes += 1
        self._wrote = True
        self.conn.execute(
            "INSERT INTO dentries (parent, name, inode) VALUES (?,?,?)", (parent, name, ino)
        )

    def remove_entry(self, parent: int, name: bytes) -> None:
        self.dentry_changes += 1
        self._parents.clear()
        self._wrote = True
        self.conn.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))

    def move_entry(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        self.dentry_changes += 1
        self._parents.clear()
        self._wrote = True
        self.conn.execute(
            "UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
            (new_parent, new_name, parent, name),
        )

    def retarget_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Point an existing entry at another inode (the two halves of RENAME_EXCHANGE)."""
        self.dentry_changes += 1
        self._parents.clear()
        self._wrote = True
        self.conn.execute(
            "UPDATE dentries SET inode=? WHERE parent=? AND name=?", (ino, parent, name)
        )

    def has_entries(self, parent: int) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,))
            .fetchone() is not None
        )

    def parent_of(self, ino: int) -> int | None:
        """The directory holding `ino` (unique for directories, one of many for hard links)."""
        self._check_caches()
        parent = self._parents.get(ino)
        if parent is None:
            row = self.conn.execute(
                "SELECT parent FROM dentries WHERE inode=? LIMIT 1", (ino,)
            ).fetchone()
            if row is None:
                return None
            if len(self._parents) >= INODE_CACHE_MAX:
                self._parents.clear()
            parent = self._parents[ino] = int(row[0])
        return parent

    def list_entries(self, parent: int, after: int) -> Iterator[tuple[int, bytes, Inode, int]]:
        """Yield (dentry id, name, inode, stored blocks) for the entries of `parent` past
        dentry id `after`. The block count (for st_blocks) comes in the same query, so a
        listing costs one statement, not one per entry."""
        for row in self.conn.execute(self._LIST, (parent, after)):
            yield row[0], row[1], Inode(*self._exact(row[2:-1])), row[-1]

    _LIST = (
        f"SELECT d.id, d.name, {_I_COLUMNS}, (SELECT count(*) FROM blocks b WHERE b.inode = i.id)"
        " FROM dentries d JOIN inodes i ON i.id = d.inode WHERE d.parent=? AND d.id>? ORDER BY d.id"
    )

    # -- extended attributes ----------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        self._check_caches()
        if ino not in self._xattr_inodes:
            return None
        row = self.conn.execute(
            "SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._xattr_inodes.add(ino)  # before: a superset is always safe
        self.conn.execute(
            "INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?,?,?)",
            (ino, name, value),
        )

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        cur = self.conn.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name))
        return cur.rowcount > 0

    def list_xattrs(self, ino: int) -> list[bytes]:
        self._check_caches()
        if ino not in self._xattr_inodes:
            return []
        return [
            bytes(r[0])
            for r in self.conn.execute("SELECT name FROM xattrs WHERE inode=? ORDER BY name",
                                       (ino,))
        ]

def garbage_runs(db_path: Path, low: int | None = None, high: int | None = None
                 ) -> list[tuple[str, int | None, int]]:
    """(id, born, died) of the garbage objects whose run of naming checkpoints is closed,
    read from the committed state on a connection of its own (blocking: a worker thread's
    job while the trio thread keeps writing). With `low`..`high`, only the runs that may
    hold a checkpoint between the two: the ones a thinning pass of those numbers may free."""
    conn = connect(db_path)
    try:
        if low is None or high is None:
            rows = conn.execute("SELECT id, born, died FROM garbage WHERE died IS NOT NULL")
        else:
            rows = conn.execute("SELECT id, born, died FROM garbage WHERE died >= ?"
                                " AND coalesce(born, 0) <= ?", (low, high))
        return [(str(r[0]), r[1], int(r[2])) for r in rows]
    finally:
        conn.close()
