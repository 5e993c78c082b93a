"""The cache dir: every file a mount keeps on local disk, what it holds, who writes it, and
what of it survives a crash.

One cache dir per workspace and machine (`--cache-dir`, else config.default_cache_dir), mode
0700, on a local filesystem (daemon/preflight.py refuses FUSE and network ones). The names
below are the layout; `CacheDir(root)` gives each a name in code, and no other module spells
them. Inside `dirty/`, `reserved/`, `clean/`, `sync/` and the journal, the modules named own the
format.

    entry                   holds; written by                          after a crash
    ----------------------  -----------------------------------------  ----------------------
    meta.db  (-wal, -shm)   the workspace's metadata, SQLite in WAL    what was synced stays:
                            mode (schema: meta/schema.py); meta/db.py  newer than the store
                            commits, the flusher syncs; fetched from   until published; the
                            the newest checkpoint when missing         next mount recovers it
                            (daemon/workspace.py, via `meta.part`)     (daemon/serve.py)
    dirty/<block id>        a block written here and not uploaded yet  kept; the journal is
                            (and empty files kept ready for new        replayed into them, the
                            ones); blocks/dirtyfiles.py, dirty.py      next mount uploads the
                                                                       ones the metadata awaits
                                                                       and deletes the others
    reserved/<id>           disk space fallocate(2) set aside for a    deleted at the next
                            file's holes, renamed into dirty/ by the   start
                            first write there; blocks/reserved.py
    journal                 the bytes of small writes an fsync(2)      replayed into dirty/ at
                            covered, synced once (blocks/journal.py);  the next start
                            blocks/fsync.py
    clean/                  copies of blocks the store holds, LRU up   kept, unless the machine
                            to --cache-size (a diskcache dir);         went down (emptied: its
                            blocks/clean.py                            files are not fsynced)
    ballast (.tmp)          a few MiB given up the moment a commit     made again
                            finds the disk full; blocks/space.py
    checkpoint.db           the metadata copy a flush cycle publishes  left over, overwritten
                            (meta/checkpoint.py's format); the flusher by the next cycle
    published.db            that copy once published: what the store   kept: tells a set-aside
                            got from this cache dir; the flusher       cache dir's conflicts
                                                                       (daemon/conflicts.py)
    pages.json (pages.tmp)  the newest manifest's pages, not uploaded  a cache: ignored unless
                            again; the flusher                         it names the metadata's
                                                                       checkpoint
    prefetch.db (.part)     the newest checkpoint, fetched while the   deleted, or used if it
                            lease is taken; daemon/workspace.py        is still the newest
    lock                    flock(2)ed by the one daemon serving this  released by the kernel
                            cache dir, holding its pid; daemon/serve.py
                            (a mount waits for a finishing holder:
                            commands/handover.py)
    status.json (.tmp)      the daemon's state, rewritten every half   stale: its pid is dead
                            second; read by `wsfs status`, `unmount`,  (daemon/status.py says
                            `run`, `recover`, a waiting mount;         so)
                            daemon/serve.py
    wsfs.log (.1, .2, ...)  the daemon's log, rotated (logs.py)        kept
    sync/<token>.req        `wsfs sync`'s requests and the daemon's    answers nobody reads
      .ok, .err             answers (daemon/control.py)                expire after an hour
    .write-test             made and deleted at once by `wsfs mount`   -
                            to check the dir is writable

Beside it, `<root>.stale-<time>`: a cache dir moved aside whole because the store had moved
on without it (daemon/workspace.py); its files the store never got come back as conflict
copies (daemon/conflicts.py, `wsfs recover`).

A read-only mount (`wsfs mount -o ro`, daemon/view.py) has a cache dir of its own kind,
under `views/` beside the default ones: `view.json` (the store it shows, and the boot it was
last used in) instead of meta.db, `views/<seq>.db` (each checkpoint it serves: the newest it
fetched, and an older one while a file opened on it stays open; copies, never published),
and `clean/`, `lock`, `status.json`, `wsfs.log`, `sync/` as above. `wsfs mount` refuses a
writer's cache dir for a read-only mount and the reverse: a writer's holds what no
checkpoint has yet.

A missing meta.db makes everything that belonged to the metadata (`CacheDir.of_the_metadata`)
a leftover of no checkpoint we know: it is deleted before a checkpoint is fetched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class CacheDir:
    """The paths of one cache dir (see the module docstring for what each holds)."""

    root: Path

    @property
    def meta_db(self) -> Path:
        return self.root / "meta.db"

    @property
    def dirty(self) -> Path:
        return self.root / "dirty"

    @property
    def reserved(self) -> Path:
        return self.root / "reserved"

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def ballast(self) -> Path:
        return self.root / "ballast"

    @property
    def checkpoint_copy(self) -> Path:
        return self.root / "checkpoint.db"

    @property
    def published(self) -> Path:
        return self.root / "published.db"

    @property
    def pages(self) -> Path:
        return self.root / "pages.json"

    @property
    def prefetch(self) -> Path:
        return self.root / "prefetch.db"

    @property
    def prefetch_part(self) -> Path:
        """What meta/checkpoint.py's fetch writes before it renames it to `prefetch`."""
        return self.root / "prefetch.part"

    @property
    def view(self) -> Path:
        """A read-only mount's cache dir holds this instead of meta.db (daemon/view.py)."""
        return self.root / "view.json"

    @property
    def views(self) -> Path:
        return self.root / "views"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def status_tmp(self) -> Path:
        return self.root / "status.json.tmp"

    @property
    def log(self) -> Path:
        return self.root / "wsfs.log"

    @property
    def sync_requests(self) -> Path:
        return self.root / "sync"

    @property
    def write_test(self) -> Path:
        return self.root / ".write-test"

    def read_status(self) -> dict[str, Any]:
        """The daemon's last status.json; {} if there is none (yet) or it cannot be read."""
        try:
            return dict(json.loads(self.status.read_text()))
        except (OSError, ValueError):
            return {}

    def set_aside(self, when: int) -> Path:
        """Where the cache dir goes when the store moved on without it (`when`: Unix time)."""
        return self.root.with_name(f"{self.root.name}.stale-{when}")

    def of_the_metadata(self) -> tuple[Path, ...]:
        """What belongs to one meta.db and means nothing without it (prefetch.db apart:
        the caller decides whether it is still the newest checkpoint)."""
        return (self.dirty, self.journal, self.clean, self.pages, self.checkpoint_copy,
                self.published, self.prefetch_part)
