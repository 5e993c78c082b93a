"""The running daemon: from the lease to the final flush, serving, signals and status.

One trio run owns one nursery: the FUSE loop, the flusher, the lease renewer, the status
writer and the signal watcher. Whatever ends the FUSE loop — `wsfs unmount`, `umount`,
`fusermount3 -u`, SIGTERM or SIGINT — the same sequence follows: every dirty block uploaded, the
final checkpoint published, the lease released, exit 0. On SIGTERM the daemon keeps serving
while it unmounts itself, so the kernel can hand over the dirty pages it still holds.

The steps before serving are startup.py's (the store, the cache dir's lock, the lease, the
kernel's mount), the mount's parts are built by wiring.py, and recovery.py picks up after an
unclean stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from .. import __version__, logs
from ..blocks import BlockCache
from ..config import MountConfig
from ..errors import FlushError, LeaseError, MountError, NoWorkspaceError, WsfsError
from ..fs import Operations, lowlevel
from ..latency import Latencies, SharedLatencies
from ..meta import checkpoint as ckpt
from ..meta.superblock import Superblock, read_superblock
from ..progress import Progress
from ..runtime import (
    favour_the_fuse_thread,
    limit_malloc_arenas,
    process_start,
    registry_path,
    sd_notify,
    syncfs,
    write_registry,
)
from ..store import ObjectStore
from ..store.timed import KINDS as TIMED_KINDS
from ..store.timed import TimedStore
from ..sync.flusher import Flusher
from ..sync.repack import Repacker
from . import conflicts, control, metrics
from .lease import Lease
from .metrics import RateMeter
from .readahead import set_readahead
from .startup import Renewal, fuse_mount, open_checked_store, take_cache_lock, take_lease
from .wiring import Mount, build
from .workspace import create, drop_prefetched, prefetch, prepare_cache, stopped_cleanly

log = logging.getLogger(__name__)


class Daemon:
    """One mounted workspace, from the lease to the final flush."""

    def __init__(self, cfg: MountConfig, cache_dir: Path, ready_fd: int | None) -> None:
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.ready_fd = ready_fd
        self.listeners: list[trio.SocketListener] = []  # --metrics, bound before the lease
        self.state = "starting"
        # the parts of the mount, once built (wiring.py)
        self.flusher: Flusher | None = None
        self.blocks: BlockCache | None = None
        self.repacker: Repacker | None = None
        self.unmounting = False
        # figures for `wsfs status` and --metrics (see status())
        self.started = time.time()
        self.pid_start = process_start(os.getpid())  # tells this daemon from a pid reused
        self.rate = RateMeter()
        self.upload_rate = 0.0
        self.cache_bytes = 0
        self.lease: Lease | None = None
        self.renewal: Renewal | None = None  # keeps the lease from its taking to its release
        self.store: ObjectStore | None = None
        self.ops: Operations | None = None
        self.fenced: str | None = None  # why this mount takes no more writes (fence())
        self.head_etag: str | None = None  # meta/HEAD as claimed at the start
        self.set_aside: Path | None = None  # the stale cache dir this start moved aside
        self.conflicts: list[dict[str, object]] = []  # conflict copies exported (status)
        self.syncs = 0
        self.fuse_latency = Latencies()  # for --metrics, from the first request on
        self.store_latency = SharedLatencies(TIMED_KINDS)
        self.caller_gone = False  # the `wsfs mount` waiting for `report_ready` is gone

    def report_ready(self, error: WsfsError | None = None) -> None:
        """Tell the waiting `wsfs mount` (and systemd) how the start went."""
        msg: dict[str, object] = {"ok": error is None}
        if error is not None:
            msg.update(code=error.exit_code, message=str(error))
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, json.dumps(msg).encode())
            except BrokenPipeError:  # `wsfs mount` was interrupted: nobody wants the mount
                self.caller_gone = True
            os.close(self.ready_fd)
            self.ready_fd = None
            # Detached: let go of the caller's terminal or pipes (logs go to wsfs.log).
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
        if error is None:
            sd_notify("READY=1")

    def leave_nothing(self, made: bool) -> None:
        """After a failed start, remove the cache dir `wsfs mount` made for it (`made`) if it
        never served and holds nothing unpublished: what it holds then is at most a copy of
        the store's newest checkpoint, and the lease was given back."""
        if made and self.state == "starting" and stopped_cleanly(self.cache_dir):
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    async def serve(self) -> None:
        cfg = self.cfg
        limiter = trio.CapacityLimiter(32)
        # Everything that can refuse the mount comes before the lease: a mount that fails
        # holding it leaves the workspace looking mounted or crashed to every other host.
        if cfg.metrics:
            self.listeners = await metrics.open_listeners(cfg.metrics)
        store = TimedStore(open_checked_store(cfg), self.store_latency)
        try:
            sb = read_superblock(store)
        except NoWorkspaceError:
            if not cfg.init:
                raise
            sb = await create(store, framework=cfg.framework, labels=cfg.labels,
                              owner=cfg.owner or (os.getuid(), os.getgid()))
        # The first file written into the cache dir: every check is behind (until now the
        # daemon logs to the terminal of `wsfs mount`, which reports what fails).
        log_file = logs.add_file_handler(self.cache_dir / "wsfs.log")
        lock = take_cache_lock(self.cache_dir)
        lease = Lease(store, str(self.cache_dir))
        try:
            prefetched = await take_lease(lease, cfg.force,
                                          partial(prefetch, store, sb, self.cache_dir, limiter))
        except LeaseError:
            drop_prefetched(self.cache_dir)  # a guess fetched for a mount that cannot be
            lock.close()
            raise
        self.lease, self.store = lease, store
        renewal = self.renewal = Renewal(lease, self)
        try:
            # From here on an earlier holder's publication fails (checkpoint.claim_head),
            # so the checkpoint fetched next is the last one it will ever have published.
            claimed = await trio.to_thread.run_sync(ckpt.claim_head, store, lease.mount_id)
            if claimed is not None:
                self.head_etag = claimed[1]
            self.set_aside = await prepare_cache(
                store, sb, self.cache_dir, limiter, prefetched,
                head=None if claimed is None else claimed[0])
            if self.set_aside is not None:  # its log and lock went with it: new ones here
                logging.getLogger().removeHandler(log_file)
                log_file.close()
                logs.add_file_handler(self.cache_dir / "wsfs.log")
                lock.close()
                lock = take_cache_lock(self.cache_dir)
                log.warning("the cache dir was behind the store: set aside as %s",
                            self.set_aside)
            mount = await build(
                cfg, self.cache_dir, store, block_size=sb.block_size, limiter=limiter,
                lease=lease, mount_id=lease.mount_id, head_etag=self.head_etag, fencing=self,
                publish=self.sync_now, writeback=self._writeback, latencies=self.fuse_latency)
            self.blocks, self.repacker = mount.blocks, mount.repacker
            self.ops, self.flusher = mount.ops, mount.flusher
            await self._serve(store, sb, mount, renewal)
        except FlushError:
            # Not released: the newest data is in this cache dir, and the store is likely
            # unreachable anyway. The lease expires by itself; this host retakes it at once.
            raise
        except BaseException:
            if not stopped_cleanly(self.cache_dir):
                # This cache dir may hold uploaded blocks no checkpoint names yet (a crash
                # under an earlier mount, or this one failing while serving), and `wsfs gc`
                # deletes such objects unless a lease is left in the store. (A start that
                # fails before serving leaves a clean cache dir clean: Flusher.serving.)
                log.error("the lease stays in the store until a mount from %s publishes "
                          "what it holds", self.cache_dir)
                raise
            await renewal.release()
            raise
        finally:
            lock.close()

    async def _serve(self, store: ObjectStore, sb: Superblock, mount: Mount,
                     renewal: Renewal) -> None:
        cfg = self.cfg
        meta, blocks, ops, flusher = mount.meta, mount.blocks, mount.ops, mount.flusher
        options = {"fsname=" + cfg.store_url.replace(",", "_"), "subtype=wsfs",
                   "default_permissions", *cfg.fuse_options}
        if cfg.read_only:
            options.add("ro")
        listeners = self.listeners
        mountpoint = os.path.realpath(cfg.mountpoint)  # (before the mount: see set_readahead)
        try:
            fuse_mount(ops, cfg.mountpoint, options)
            lowlevel.add_handlers(ops)  # fallocate and lseek: pyfuse3 has no handlers for them
        except BaseException:
            meta.close()  # clean still, if it was: nothing was served (Flusher.serving)
            blocks.close()
            raise
        flusher.serving()
        self.state = "serving"
        write_registry(cfg.mountpoint, self.cache_dir, cfg.store_url)
        # Before the answer: `wsfs mount` exits the moment it has it, and whatever runs next
        # (`wsfs status`, a test reading the daemon's pid) must find this daemon's status.
        self.write_status()
        self.report_ready()
        log.info("mounted %s on %s", cfg.store_url, cfg.mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                nursery.start_soon(flusher.run)
                nursery.start_soon(mount.repacker.run)
                nursery.start_soon(blocks.maintain)
                nursery.start_soon(self._write_status)
                nursery.start_soon(self._watch_signals, nursery)
                if self.caller_gone:  # told "interrupted" already: undo the mount at once
                    log.warning("`wsfs mount` was interrupted while starting: unmounting %s",
                                cfg.mountpoint)
                    self.unmounting = True
                    nursery.start_soon(self._unmount_self)
                nursery.start_soon(self._widen_readahead, ops, mountpoint, sb.block_size)
                if self.set_aside is not None:
                    nursery.start_soon(self._export_conflicts, ops, store, mountpoint,
                                       sb.block_size)
                if listeners:
                    nursery.start_soon(metrics.serve, listeners, metrics.Figures(
                        self.status, self.fuse_latency, self.store_latency))
                await pyfuse3.main()
                log.info("unmounted %s; uploading what is left", cfg.mountpoint)
                self.state = "flushing"
                ops.nursery = None
                nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=False)
            # FlushError is taken out of the nursery by hand: raised inside it, it would
            # arrive wrapped in an ExceptionGroup and miss the handler below.
            flush_error: FlushError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_status)
                nursery.start_soon(self._show_flush_progress)
                try:
                    await flusher.flush_all(cfg.unmount_timeout)
                except FlushError as e:
                    flush_error = e
                finally:
                    nursery.cancel_scope.cancel()
            if flush_error is not None:
                raise flush_error
        except FlushError as e:
            self.state = "failed"
            flusher.last_error = str(e)  # what `wsfs unmount` reports
            raise
        finally:
            self.write_status()
            try:
                meta.close()  # its last commit releases discarded blocks, which close() deletes
            finally:
                blocks.close()
            registry_path(cfg.mountpoint).unlink(missing_ok=True)
        await renewal.release()  # a failure leaves the unmount a success: all is stored
        self.state = "done"
        self.write_status()
        log.info("every block is in %s; done", cfg.store_url)

    async def _export_conflicts(self, ops: Operations, store: ObjectStore, mountpoint: str,
                                block_size: int) -> None:
        """Write what the cache dir set aside at the start holds that the store never got
        into the workspace, under /.wsfs-conflicts/<host>-<time>/ (through the mount, so
        they are published like any write)."""
        aside = self.set_aside
        assert aside is not None
        if self.cfg.read_only:
            log.warning("%s may hold files the store never got; this mount is read-only: "
                        "run `wsfs recover %s --into DIR` to get them", aside, aside)
            return
        await ops.initialized.wait()
        into = (Path(mountpoint) / conflicts.CONFLICTS_DIR
                / conflicts.conflicts_name(socket.gethostname(), time.time()))
        try:
            count = await trio.to_thread.run_sync(conflicts.export, aside, store, block_size,
                                                  into)
        except Exception as e:
            log.error("could not export the files of %s the store never got (%s): run "
                      "`wsfs recover %s --into DIR` to get them", aside, e, aside)
            return
        if count:
            log.warning("%s held %d files the store never got (written by a mount that lost "
                        "the workspace before it learned so): they are in %s", aside, count,
                        into)
            self.conflicts.append({"source": str(aside), "into": str(into), "files": count})
        else:
            log.info("%s holds nothing the store lacks", aside)

    async def sync_now(self) -> None:
        """Publish every change made so far: what an fsync(2) waits for under -o
        fsync_remote. (Given to the filesystem, which is built before the flusher.)"""
        assert self.flusher is not None  # built before the mount serves any request
        await self.flusher.sync_now()

    def fence(self, reason: str) -> None:
        """This mount learned that another one holds the workspace (its lease renewal was
        refused, a conditional write was, or the lease read back names another mount):
        from now on writes get EROFS, reads go on, nothing is published (in the trio
        thread)."""
        if self.fenced is not None:
            return
        self.fenced = reason
        log.error("this mount is fenced: %s", reason)
        if self.ops is not None:
            self.ops.fence(reason)
        if self.flusher is not None:
            self.flusher.fence(LeaseError(reason))
        if self.repacker is not None:
            self.repacker.fence()  # its new packs could never be published

    async def _write_status(self) -> None:
        while True:
            f, b = self.flusher, self.blocks
            if f is not None:
                self.upload_rate = self.rate.sample(f.uploaded_bytes)
            if b is not None:
                with contextlib.suppress(Exception):  # a figure, never worth failing for
                    self.cache_bytes = b.clean.volume()
            self.write_status()
            await trio.sleep(0.5)

    async def _show_flush_progress(self) -> None:
        """The final flush's progress: a live line at a terminal (-f), and the log."""
        f = self.flusher
        assert f is not None
        progress = Progress(f"flushing {self.cfg.mountpoint}", tty=sys.stderr.isatty())
        try:
            while True:
                left_bytes, left_blocks = f.not_uploaded()
                progress.update(left_bytes, self.upload_rate, left_blocks, note=f.last_error)
                await trio.sleep(0.5)
        finally:
            progress.finish()

    def status(self) -> dict[str, object]:
        """The daemon's figures, for `wsfs status`, `wsfs unmount`'s progress and --metrics."""
        f, b = self.flusher, self.blocks
        lease, renewal = self.lease, self.renewal
        left = (f.not_uploaded() if f else (b.dirty_bytes, b.dirty_count) if b else (0, 0))
        return {
            "pid": os.getpid(), "pid_start": self.pid_start, "state": self.state,
            "store": self.cfg.store_url,
            "mountpoint": str(self.cfg.mountpoint), "cache_dir": str(self.cache_dir),
            "time": time.time(), "started": self.started, "version": __version__,
            # written and not yet in the store (the cache's dirty blocks count until the
            # commit after their upload)
            "dirty_bytes": left[0], "dirty_blocks": left[1],
            "dirty_limit": self.cfg.dirty_limit,
            "cache_hits": b.hits if b else 0, "cache_misses": b.misses if b else 0,
            "downloads": b.clean.downloads if b else 0,
            "cache_bytes": self.cache_bytes, "cache_limit": self.cfg.cache_size,
            "checkpoint": f.seq if f else 0,
            "last_checkpoint_time": f.last_publish_time if f else None,
            "uploaded_blocks": f.uploaded_blocks if f else 0,
            "uploaded_bytes": f.uploaded_bytes if f else 0,
            "uploading_blocks": f.uploading_blocks if f else 0,
            "uploading_bytes": f.uploading_bytes if f else 0,
            "upload_rate": self.upload_rate,
            "retries": f.retries if f else 0, "errors": f.errors if f else 0,
            "last_error": f.last_error if f else None,
            "lease": None if lease is None else {
                "host": socket.gethostname(), "pid": os.getpid(), "mount_id": lease.mount_id,
                "renewed": renewal.renewed if renewal else None, "ttl": lease.ttl,
                "error": renewal.error if renewal else None},
            "syncs": self.syncs, "metrics": self.cfg.metrics,
            "fenced": self.fenced, "conflicts": self.conflicts,
            "fencing": getattr(self.store, "conditional_writes", None),
            **(self.repacker.figures() if self.repacker else {}),
            **(f.retention.figures() if f else {}),
        }

    def write_status(self) -> None:
        """Publish status() to cache_dir/status.json (atomically) every half second."""
        tmp = self.cache_dir / "status.json.tmp"
        try:
            tmp.write_text(json.dumps(self.status()))
            tmp.replace(self.cache_dir / "status.json")
        except OSError as e:  # a full cache disk must not take the mount down with it
            log.debug("cannot write the status file: %s", e)

    @staticmethod
    async def _widen_readahead(ops: Operations, mountpoint: str, size: int) -> None:
        await ops.initialized.wait()  # before, the kernel's answer to INIT would undo it
        await trio.to_thread.run_sync(set_readahead, mountpoint, size)

    async def _watch_signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                       control.SYNC_SIGNAL) as sigs:
            async for signum in sigs:
                if signum == control.SYNC_SIGNAL:  # `wsfs sync`
                    nursery.start_soon(self._answer_sync_requests)
                    continue
                if self.unmounting:
                    log.warning("still unmounting; the flush continues (SIGKILL loses nothing "
                                "already written, the next mount uploads it)")
                    continue
                log.info("got %s: unmounting %s", signal.Signals(signum).name,
                         self.cfg.mountpoint)
                self.unmounting = True
                nursery.start_soon(self._unmount_self)

    async def _answer_sync_requests(self) -> None:
        assert self.flusher is not None

        def count_and_publish(answered: int) -> None:
            # `wsfs sync` reads status.json once answered: it must show this sync, not the
            # state of up to half a second before it (test_status found the stale one).
            self.syncs += answered
            self.write_status()

        await control.answer_requests(self.cache_dir, self.flusher.sync_now, count_and_publish)

    async def _writeback(self) -> None:
        """Have the kernel hand over every dirty page of the mount (Operations.writeback)."""
        await trio.to_thread.run_sync(syncfs, str(self.cfg.mountpoint), abandon_on_cancel=True)

    async def _unmount_self(self) -> None:
        """Unmount while still serving, so the kernel can write back its dirty pages."""
        mp = str(self.cfg.mountpoint)
        try:
            await trio.to_thread.run_sync(syncfs, mp, abandon_on_cancel=True)
        except OSError as e:
            log.warning("syncfs(%s) failed: %s", mp, e)
        for attempt in range(10):
            result = await trio.run_process(["fusermount3", "-u", mp], check=False,
                                            capture_stderr=True)
            if result.returncode == 0:
                return
            log.warning("fusermount3 -u %s failed (attempt %d): %s", mp, attempt + 1,
                        result.stderr.decode().strip())
            await trio.sleep(1)
        log.warning("unmounting %s lazily: processes still hold files open", mp)
        await trio.run_process(["fusermount3", "-uz", mp], check=False)


def run_daemon(cfg: MountConfig, cache_dir: Path, ready_fd: int | None,
               made: bool = False, kind: type[Daemon] = Daemon) -> None:
    """Run the mount in this process until it is unmounted and flushed.

    `made`: `wsfs mount` created the cache dir for this mount; a start that fails before
    serving removes it again, leaving nothing behind. `kind`: the daemon (a read-only
    mount's is daemon/view.py's).
    """
    # Private by default: the cache dir holds every file name, the data and the logs.
    os.umask(0o077)
    limit_malloc_arenas()
    favour_the_fuse_thread()
    # `wsfs sync`'s signal must never kill the daemon, even outside the signal watcher's life.
    signal.signal(control.SYNC_SIGNAL, signal.SIG_IGN)
    daemon = kind(cfg, cache_dir, ready_fd)
    try:
        trio.run(daemon.serve)
    except WsfsError as e:
        daemon.leave_nothing(made)
        if daemon.ready_fd is not None:
            daemon.report_ready(e)
            sys.exit(e.exit_code)
        if daemon.state != "starting":  # a failed start: `wsfs mount -f` says it, once
            log.error("%s", e)
        raise
    except BaseException as e:
        # While starting, `wsfs mount` prints the reason in one sentence: the traceback is
        # for wsfs.log (where it is open), not the caller's terminal.
        starting = daemon.ready_fd is not None
        log.exception("the wsfs daemon failed", extra=logs.FILE_ONLY if starting else None)
        daemon.leave_nothing(made)
        if starting:
            err = MountError(f"the wsfs daemon failed while starting: {e}")
            daemon.report_ready(err)
            sys.exit(err.exit_code)
        raise
