"""Typed access to the live metadata database (`meta.db`).

SQLite is called synchronously from the trio thread, between awaits: each call is a few
microseconds, and running every statement in the one thread that runs the FUSE handlers makes
each handler atomic without locks (S3QL does the same). The database runs in WAL mode with
`synchronous=NORMAL`: a commit survives a crash of the daemon (it is in the OS page cache), and
`sync()` makes it survive a crash of the machine, which is what fsync(2) promises.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .schema import FORMAT_VERSION, TIMES, create_schema, upgrade

log = logging.getLogger(__name__)


class CommitLost(sqlite3.OperationalError):
    """A group commit failed and SQLite rolled it back: its changes are gone."""


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


INODE_CACHE_MAX = 16384  # cached inode rows (~300 bytes each); a full cache starts over
_I_COLUMNS = _inode_columns("i.")
_GET_INODE = f"SELECT {_inode_columns('')} FROM inodes WHERE id=?"
_GET_TIMES = f"SELECT {_TIME_COLUMNS} FROM inodes WHERE id=?"
_BLOCK_COUNT = "SELECT count(*) FROM blocks WHERE inode=?"
_IN_LIST_MAX = 500  # ids per "IN (...)" statement: far below SQLite's limit on parameters
InodeRow = tuple[int, int, int, int, int, int, int, int, int, int, bytes | None]  # times in ns


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Where one block of a file lives: its id, its checksum once uploaded, and the pack
    holding it if it was uploaded in one."""

    idx: int
    id: str
    csum: str | None
    pack: str | None


class CommitHooks(Protocol):
    """What the metadata's commits mean to the layer that keeps the blocks' files (blocks/).

    A block the metadata lets go of keeps its file until that change is committed and then
    synced (a crash must never bring back metadata naming a block whose file is gone), and
    an uploaded block keeps its file until its checksum is committed; a rollback brings
    references back. The metadata knows no blocks: it says when, and answers through
    `awaits_upload` (Metadata.awaits_upload) which blocks it still names without a checksum.
    Given to the constructor; the block cache (blocks/cache.py) is the one implementer.
    """

    def before_commit(self) -> None:
        """A commit is about to write: make room on the disk for it."""

    def after_commit(self, commit: int, awaits_upload: Callable[[str], bool]) -> None:
        """Commit number `commit` (of this process) is done, or there was nothing to commit."""

    def after_rollback(self, awaits_upload: Callable[[str], bool]) -> None:
        """A savepoint, or SQLite's own rollback of the whole group, undid changes."""

    def after_sync(self, synced: int) -> None:
        """The commits up to number `synced` are durable. Runs in the worker thread of
        `Metadata.sync`: it records the number and does nothing else."""


def connect(path: Path) -> sqlite3.Connection:
    """Open a metadata database with the settings every connection must use."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB of page cache
    return conn


class Metadata:
    """The filesystem's metadata: inodes, directory entries, xattrs and the block map."""

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

    def _check_caches(self) -> bool:
        """Reset the caches if SQLite rolled the group transaction back by itself (a full
        disk or an I/O error does that): we wrote, and no transaction is open any more.
        Returns whether it did."""
        if self._wrote and not self.conn.in_transaction:
            self._reset_caches()
            self._after_rollback()
            return True
        return False

    def _after_rollback(self) -> None:
        if self.hooks is not None:
            try:
                self.hooks.after_rollback(self.awaits_upload)
            except Exception:  # never instead of the failure that rolled back
                log.exception("after a rollback")

    def close(self) -> None:
        try:
            self.flush()
            if self.commits > self.synced_commits:  # (an open to read settings syncs nothing)
                self.sync()
        finally:
            self.conn.close()

    # -- settings ---------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value)
        )

    # -- transactions -----------------------------------------------------------------------

    # Group commit: changes accumulate in one open transaction that `flush()` commits (the
    # flusher calls it every tick, and before every snapshot and fsync). A commit per FUSE
    # request would write several WAL pages per request; a crash can only lose what no
    # fsync(2) acknowledged, and a lost transaction loses metadata and the dirty blocks it
    # referenced together (recovery deletes unreferenced dirty blocks).

    def begin(self) -> None:
        """Start a group of statements that apply (or roll back) together: a savepoint."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
        self.conn.execute("SAVEPOINT op")

    def commit(self) -> None:
        self.conn.execute("RELEASE op")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK TO op")
            self.conn.execute("RELEASE op")
        finally:
            self._inodes.clear()
            self._parents.clear()
            self._nblocks.clear()
            self.dentry_changes += 1
            if not self._check_caches():  # (else the whole group's rollback called the hook)
                self._xattr_inodes.update(
                    int(r[0]) for r in self.conn.execute("SELECT DISTINCT inode FROM xattrs"))
                self._after_rollback()

    def flush(self) -> None:
        """Commit everything so far: durable against a daemon crash, visible to snapshots.

        Raises CommitLost if the commit failed and SQLite rolled the group back (a full
        disk): the caller must not act as if those changes were durable.
        """
        if self.conn.in_transaction:
            if self.hooks is not None:
                self.hooks.before_commit()
            try:
                self.conn.commit()
            except sqlite3.Error as e:
                self._check_caches()
                if not self.conn.in_transaction:
                    raise CommitLost(f"the metadata commit failed and was rolled back: {e}") from e
                raise
            self.commits += 1
        self._wrote = False
        if self.hooks is not None:
            self.hooks.after_commit(self.commits, self.awaits_upload)

    def sync(self) -> None:
        """Make every committed change durable on disk (blocking: call from a worker thread
        after `flush()` in the trio thread).

        Only the WAL holds commits that are not yet durable: SQLite fsyncs the database file
        itself whenever it checkpoints the WAL into it (synchronous=NORMAL). fdatasync, as
        SQLite does: the WAL's length counts, its mtime does not (and costs a journal commit).

        Counts the commits it covers in `synced_commits`: those counted before it began had
        written their frames. (Two syncs finishing at once may leave the smaller count:
        files then wait for the next sync, never the reverse.)
        """
        if self._sync_failed:
            raise OSError(errno.EIO, "an earlier sync of the metadata failed; remount to "
                          "recover what the disk holds")
        covered = self.commits
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:  # no WAL: every commit is in the database file, synced
            pass
        else:
            try:
                os.fdatasync(fd)
            except OSError as e:
                # The kernel reports a failed writeback (EIO) once: a later sync through a
                # new fd would succeed over pages it never wrote. So every later one fails
                # too: nothing counts as durable again in this mount (fsync(2) says EIO).
                # A full disk is not that: its pages stay dirty, and a retry is honest.
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    self._sync_failed = True
                raise
            finally:
                os.close(fd)
        if covered > self.synced_commits:
            self.synced_commits = covered
        if self.hooks is not None:
            self.hooks.after_sync(self.synced_commits)

    @property
    def total_changes(self) -> int:
        """A counter that grows with every change: tells the flusher whether to checkpoint."""
        return self.conn.total_changes

    @property
    def data_changes(self) -> int:
        """A counter that grows with every change but those of timestamps alone: what an
        fdatasync(2) must make durable (the kernel's mtime updates under the writeback cache
        come as a setattr before each fsync, so without this every fdatasync synced the WAL)."""
        return self.conn.total_changes - self.time_changes

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
        if len(self._nblocks) >= INODE_CACHE_MAX:
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
