"""The metadata database's group commit: savepoints, commits, rollbacks and syncs, and what
they tell the layer that keeps the blocks' files (CommitHooks).

Half of `Metadata` (db.py), which inherits it, apart from the statements because it is the
durability contract every other layer relies on: when a change survives a crash of the daemon
(a commit), when one of the machine (a sync), and what a failed commit undoes.

Changes accumulate in one open transaction that `flush()` commits (the flusher calls it every
tick, and before every snapshot and fsync). A commit per FUSE request would write several WAL
pages per request; a crash can only lose what no fsync(2) acknowledged, and a lost
transaction loses metadata and the dirty blocks it referenced together (recovery deletes
unreferenced dirty blocks).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class CommitLost(sqlite3.OperationalError):
    """A group commit failed and SQLite rolled it back: its changes are gone."""


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


class GroupCommit:
    """Transactions of the metadata database (see the module docstring)."""

    # Metadata's (db.py): its database, the block cache told of its commits, the figures,
    # and whether the group transaction wrote (what a rollback by SQLite itself undoes).
    path: Path
    conn: sqlite3.Connection
    hooks: CommitHooks | None
    commits: int  # commits made
    synced_commits: int  # how many of them a finished `sync` made durable
    time_changes: int  # changes that only moved an inode's timestamps
    _sync_failed: bool
    _wrote: bool
    awaits_upload: Callable[[str], bool]  # BlockMap's (blockmap.py), for the hooks

    def _check_caches(self) -> bool:
        raise NotImplementedError  # Metadata's: forget its caches after SQLite's own rollback

    def _rolled_back(self) -> bool:
        raise NotImplementedError  # Metadata's: forget its caches after a savepoint's

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
            if not self._rolled_back():  # (else the whole group's rollback called the hook)
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
