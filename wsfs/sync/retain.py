"""The running daemon's retention: thin the checkpoints on the schedule, and let garbage go
only once no kept checkpoint names it.

After each publication the flusher hands over the new manifest and the garbage it is the
first checkpoint to leave out (`after_publish`), and deletes what this returns:
1. the checkpoint joins the known ones (meta/history.py `History`, listed from the store at
   the first publication, then kept up to date by this daemon, the only publisher);
2. if the schedule lets a known checkpoint go and no pass ran for `interval` seconds, a
   thinning pass (`History.thin`, in a worker thread) deletes the checkpoints neither the
   schedule nor a name keeps;
3. the garbage that may go now, each object asked `retention.may_delete` against the
   checkpoints that may still be in the store: the objects this checkpoint left out, and
   after a pass every object whose run of naming checkpoints held one it deleted (all of
   them after the first pass, or after a failed delete).

So garbage is never deleted while a kept checkpoint names it, whichever way it became garbage
(a file deleted or rewritten, a pack emptied by the repacker: sync/repack.py): the old rule,
"delete after the next checkpoint", is the special case of a schedule that keeps only the
newest (`--keep 0`). Should the store be unreachable, a pass fails, is logged and is tried
at the next publication; until the checkpoints were listed once, only objects no checkpoint
ever named may go.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import trio

from ..config import env_seconds
from ..meta import Metadata
from ..meta.checkpoint import Manifest
from ..meta.db import garbage_runs
from ..meta.history import History
from ..meta.retention import DEFAULT_KEEP, Schedule, may_delete
from ..store import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0  # seconds between thinning passes, at least


def default_interval() -> float:
    """$WSFS_THIN_INTERVAL (tests use 0), else DEFAULT_INTERVAL."""
    return env_seconds("WSFS_THIN_INTERVAL", DEFAULT_INTERVAL)


class Retention:
    """Thinning and the garbage that may go, for one mount (see the module docstring)."""

    def __init__(self, meta: Metadata, store: ObjectStore, limiter: trio.CapacityLimiter,
                 schedule: Schedule | None = None, *, interval: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.meta = meta
        self.store = store
        self.limiter = limiter
        self.schedule = schedule if schedule is not None else Schedule.parse(DEFAULT_KEEP)
        self.interval = default_interval() if interval is None else interval
        self.clock = clock
        self.history = History()
        self._last_pass = -math.inf
        self._scan_all = True  # the next pass looks at every closed run
        # figures for status and tests
        self.passes = 0
        self.thinned = 0  # checkpoints deleted
        self.errors = 0
        self.last_error: str | None = None

    def figures(self) -> dict[str, object]:
        return {"keep": str(self.schedule), "kept_checkpoints": len(self.history.manifests),
                "thinned_checkpoints": self.thinned, "thin_errors": self.errors,
                "thin_last_error": self.last_error}

    def delete_failed(self) -> None:
        """The flusher could not delete what `after_publish` returned: its rows stay, and
        the next pass looks at every run again."""
        self._scan_all = True

    async def after_publish(self, manifest: Manifest, closed: list[tuple[str, int | None]]
                            ) -> list[str]:
        """The garbage that may leave the store now that `manifest` is published; `closed`:
        (id, born) of the objects it is the first to leave out (their runs end before it)."""
        self.history.add(manifest)
        now = self.clock()
        deleted: list[int] | None = None
        if not self.history.listed or (now - self._last_pass >= self.interval
                                       and self.history.thinnable(self.schedule, now)):
            self._last_pass = now
            self.passes += 1
            try:
                thinned = await trio.to_thread.run_sync(
                    self.history.thin, self.store, self.schedule, now, limiter=self.limiter)
            except Exception as e:
                self.errors += 1
                self.last_error = str(e)
                log.warning("could not thin the checkpoints (tried again later): %s", e)
            else:
                deleted = thinned.deleted
                self.thinned += len(deleted)
        runs = {i: (born, manifest.seq - 1) for i, born in closed}
        if deleted is not None and (deleted or self._scan_all):
            self.meta.flush()  # the scan reads what is committed: the runs closed so far
            low, high = (None, None) if self._scan_all else (min(deleted), max(deleted))
            self._scan_all = False
            found = await trio.to_thread.run_sync(garbage_runs, self.meta.path, low, high,
                                                  limiter=self.limiter)
            runs.update((i, (born, died)) for i, born, died in found)
        # Every checkpoint up to this one may be in the store until the store was listed.
        kept = self.history.kept() if self.history.listed else range(manifest.seq + 1)
        return sorted(i for i, (born, died) in runs.items() if may_delete(born, died, kept))
