"""A read-only mount (`wsfs mount -o ro [--at WHEN]`): a published checkpoint, served
without the lease, on any machine, beside the writer.

A checkpoint in the store is a complete, consistent image of the workspace, and the store is
all two machines share, so a reader needs no coordination with the writer: it reads what a
checkpoint names and never writes. With `--at` the mount shows the kept checkpoint WHEN names
(meta/retention.py `resolve`: a number, a snapshot name, a time or an age) and stays there;
without, it shows the newest and follows the writer: every `--refresh` seconds it reads
meta/HEAD (one GET), and when a newer checkpoint is published it fetches the pages that
changed (checkpoint.fetch's `have`) and moves (fs/views.py `switch`, which says what a reader
sees meanwhile). `wsfs sync MOUNTPOINT` makes it look at once.

Nothing here can change the store: the store is wrapped read-only (store/readonly.py), there
is no lease, no flusher, no repacker and no thinning, and the data is fetched into the clean
cache as a mount on an empty cache fetches it, lazily, as it is read. Its cache dir is of its
own kind (cachedir.py: `view.json`, `views/<seq>.db`), never a writer's.

What it relies on: the objects of the checkpoint it shows stay in the store while that
checkpoint is kept (retention.py; by default every checkpoint of the last 15 minutes, so a
follower is always on a kept one). A file still open on a checkpoint the writer has since let
go of may read EIO once its blocks are deleted; so may a past checkpoint published by a
version of wsfs that did not keep every kept checkpoint whole (its manifest says so).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pyfuse3
import trio

from .. import __version__, logs
from ..blocks import BlockCache
from ..cachedir import CacheDir
from ..config import MountConfig
from ..errors import NoWorkspaceError, UsageError
from ..fs import lowlevel
from ..fs.views import View, ViewOperations
from ..meta import Metadata, retention
from ..meta import checkpoint as ckpt
from ..meta.compare import changes
from ..meta.history import History, read_snapshots
from ..meta.superblock import Superblock, read_superblock
from ..runtime import registry_path, write_registry
from ..store import ObjectStore
from ..store.readonly import ReadOnlyStore
from ..store.timed import TimedStore
from . import control, metrics
from .recovery import boot_id
from .serve import Daemon
from .startup import fuse_mount, open_checked_store, take_cache_lock

log = logging.getLogger(__name__)


class ViewDaemon(Daemon):
    """One read-only mount, from the choice of its checkpoint to the unmount."""

    def __init__(self, cfg: MountConfig, cache_dir: Path, ready_fd: int | None) -> None:
        super().__init__(cfg, cache_dir, ready_fd)
        self.dirs = CacheDir(self.cache_dir)
        self.view_ops: ViewOperations | None = None
        self.manifests: dict[int, ckpt.Manifest] = {}  # of the views open, by number
        self.looked: float | None = None  # the last look at meta/HEAD that answered
        self.look_error: str | None = None
        self.moved: float | None = None  # when the view last moved to a newer checkpoint
        self._looking = trio.Lock()

    @property
    def following(self) -> bool:
        return self.cfg.at is None

    def leave_nothing(self, made: bool) -> None:
        if made and self.state == "starting":
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    async def serve(self) -> None:
        cfg = self.cfg
        limiter = trio.CapacityLimiter(32)
        if cfg.metrics:
            self.listeners = await metrics.open_listeners(cfg.metrics)
        store = TimedStore(ReadOnlyStore(open_checked_store(cfg)), self.store_latency)
        self.store = store
        sb = read_superblock(store)
        seq = await trio.to_thread.run_sync(self._choose, store)
        logs.add_file_handler(self.dirs.log)
        lock = take_cache_lock(self.cache_dir)
        try:
            self._prepare_cache_dir()
            view = await self._open_view(store, seq, limiter)
            await self._serve_view(store, sb, view, limiter)
        finally:
            lock.close()

    def _choose(self, store: ObjectStore) -> int:
        """The checkpoint to mount: the newest, or the kept one `--at` names (blocking).
        Raises UsageError with one sentence for a WHEN that names none."""
        at = self.cfg.at
        if at is None:
            seq = ckpt.read_head(store)
            if seq is None:
                raise NoWorkspaceError(f"{store.url} has no checkpoint to show yet")
            return seq
        history = History()
        history.refresh(store)
        names = {n: s.seq for n, s in read_snapshots(store).items()}
        try:
            seq = retention.resolve(at, history.times(), names, time.time())
        except retention.BadWhen as e:
            raise UsageError(f"cannot mount {store.url} at {at!r}: {e}") from None
        manifest = history.manifests.get(seq)
        if manifest is not None and not manifest.whole:
            log.warning("checkpoint %d was published by an older wsfs, which kept only the "
                        "newest checkpoint whole: files whose data changed since may read EIO",
                        seq)
        return seq

    def _prepare_cache_dir(self) -> None:
        """Mark the cache dir a read-only mount's (cachedir.py), and drop what an earlier
        mount of it left: its checkpoint copies, and its clean copies if the machine went
        down since (they are written without fsync)."""
        dirs = self.dirs
        try:
            last = json.loads(dirs.view.read_text())
        except (OSError, ValueError):
            last = {}
        boot = boot_id()
        if last and last.get("boot_id") != boot:
            shutil.rmtree(dirs.clean, ignore_errors=True)
        shutil.rmtree(dirs.views, ignore_errors=True)
        dirs.views.mkdir()
        tmp = dirs.view.with_suffix(".tmp")
        tmp.write_text(json.dumps({"store": self.cfg.store_url, "boot_id": boot}))
        tmp.replace(dirs.view)

    def _view_path(self, seq: int) -> Path:
        return self.dirs.views / f"{seq}.db"

    async def _open_view(self, store: ObjectStore, seq: int, limiter: trio.CapacityLimiter,
                         have: View | None = None) -> View:
        """Fetch checkpoint `seq` (from the pages `have` shares with it, if given) and open
        it."""
        path = self._view_path(seq)
        earlier = None if have is None else (self._view_path(have.seq), self.manifests[have.seq])
        manifest = await ckpt.fetch(store, seq, path, limiter, have=earlier)
        self.manifests[seq] = manifest
        meta = await trio.to_thread.run_sync(Metadata, path, limiter=limiter)
        return View(seq, manifest.created_ns, meta)

    def _retire(self, view: View) -> None:
        """A view nothing uses any more: close it and delete its copy (fs/views.py)."""
        view.meta.close()
        self.manifests.pop(view.seq, None)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self._view_path(view.seq)}{suffix}").unlink(missing_ok=True)

    async def _serve_view(self, store: ObjectStore, sb: Superblock, view: View,
                     limiter: trio.CapacityLimiter) -> None:
        cfg = self.cfg
        blocks = self.blocks = BlockCache(
            self.cache_dir, store, block_size=sb.block_size, cache_size=cfg.cache_size,
            dirty_limit=cfg.dirty_limit, limiter=limiter, read_timeout=cfg.read_timeout)
        ops = self.view_ops = ViewOperations(view, blocks, cache_timeout=cfg.cache_timeout,
                                             latencies=self.fuse_latency, retire=self._retire)
        self.ops = ops
        options = {"fsname=" + cfg.store_url.replace(",", "_"), "subtype=wsfs",
                   "default_permissions", "ro", *cfg.fuse_options}
        mountpoint = os.path.realpath(cfg.mountpoint)
        try:
            fuse_mount(ops, cfg.mountpoint, options)
            lowlevel.add_handlers(ops)
        except BaseException:
            self._close(ops, blocks)
            raise
        self.state = "serving"
        write_registry(cfg.mountpoint, self.cache_dir, cfg.store_url, view=True)
        self.write_status()
        self.report_ready()
        log.info("mounted %s read-only on %s: checkpoint %d%s", cfg.store_url, cfg.mountpoint,
                 view.seq, ", following the writer" if self.following else "")
        try:
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                nursery.start_soon(ops.keep_kernel_current)
                nursery.start_soon(self._write_status)
                nursery.start_soon(self._watch_signals, nursery)
                if self.caller_gone:
                    self.unmounting = True
                    nursery.start_soon(self._unmount_self)
                nursery.start_soon(self._widen_readahead, ops, mountpoint, sb.block_size)
                if self.following and cfg.refresh > 0:
                    nursery.start_soon(self._follow, store, limiter)
                if self.listeners:
                    nursery.start_soon(metrics.serve, self.listeners, metrics.Figures(
                        self.status, self.fuse_latency, self.store_latency))
                await pyfuse3.main()
                ops.nursery = None
                nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=False)
        finally:
            self._close(ops, blocks)
            registry_path(cfg.mountpoint).unlink(missing_ok=True)
        self.state = "done"
        self.write_status()
        log.info("unmounted %s", cfg.mountpoint)

    @staticmethod
    def _close(ops: ViewOperations, blocks: BlockCache) -> None:
        try:
            for meta in {id(v.meta): v.meta for v in (ops.view, *ops.pinned_views())}.values():
                meta.close()
        finally:
            blocks.close()

    # -- following the writer --------------------------------------------------------------

    async def _follow(self, store: ObjectStore, limiter: trio.CapacityLimiter) -> None:
        while True:
            await trio.sleep(self.cfg.refresh)
            await self.look(store, limiter)

    async def look(self, store: ObjectStore, limiter: trio.CapacityLimiter) -> None:
        """Move to the newest checkpoint if the writer published one (a failure is logged and
        left for the next look: the view stays where it is)."""
        ops = self.view_ops
        assert ops is not None
        async with self._looking:
            failing, self.look_error = self.look_error, None
            try:
                seq = await trio.to_thread.run_sync(ckpt.read_head, store, limiter=limiter)
                self.looked = time.time()
                if failing is not None:
                    log.info("the store answers again")
                current = ops.view
                if seq is None or seq == current.seq:
                    return
                start = time.monotonic()
                view = await self._open_view(store, seq, limiter, have=current)
                try:
                    found = await trio.to_thread.run_sync(
                        changes, self._view_path(current.seq), self._view_path(seq),
                        limiter=limiter)
                except BaseException:
                    self._retire(view)
                    raise
                ops.switch(view, found)
                self.moved = time.time()
                log.info("moved to checkpoint %d in %.2fs (%d inodes, %d entries changed)",
                         seq, time.monotonic() - start, len(found.inodes), len(found.entries))
            except Exception as e:  # an outage, a checkpoint thinned meanwhile, a full disk
                self.look_error = f"{type(e).__name__}: {e}"
                if self.look_error != failing:  # (once, not at every look)
                    log.warning("cannot move to the newest checkpoint yet (checkpoint %d stays "
                                "shown): %s", ops.view.seq, self.look_error)

    async def _answer_sync_requests(self) -> None:
        """`wsfs sync` on a read-only mount: look for a newer checkpoint now."""
        store = self.store
        assert store is not None
        limiter = trio.CapacityLimiter(8)

        async def look_now() -> None:
            if self.following:
                await self.look(store, limiter)

        def count(answered: int) -> None:
            self.syncs += answered
            self.write_status()

        await control.answer_requests(self.cache_dir, look_now, count)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        ops, b = self.view_ops, self.blocks
        view = None if ops is None else ops.view
        return {
            "pid": os.getpid(), "pid_start": self.pid_start, "state": self.state,
            "store": self.cfg.store_url,
            "mountpoint": str(self.cfg.mountpoint), "cache_dir": str(self.cache_dir),
            "time": time.time(), "started": self.started, "version": __version__,
            "view": {
                "following": self.following, "at": self.cfg.at, "refresh": self.cfg.refresh,
                "checkpoint": None if view is None else view.seq,
                "published": None if view is None else view.created_ns / 1e9,
                "looked": self.looked, "moved": self.moved, "error": self.look_error,
                "moves": 0 if ops is None else ops.moves,
                "older_open": 0 if ops is None else len(ops.pinned_views()),
            },
            "checkpoint": None if view is None else view.seq,
            "dirty_bytes": 0, "dirty_blocks": 0, "uploaded_bytes": 0,
            "cache_hits": b.hits if b else 0, "cache_misses": b.misses if b else 0,
            "downloads": b.clean.downloads if b else 0,
            "cache_bytes": self.cache_bytes, "cache_limit": self.cfg.cache_size,
            "lease": None, "syncs": self.syncs, "metrics": self.cfg.metrics,
        }

