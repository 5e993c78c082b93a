"""`wsfs mount`: every check that can fail before a daemon starts, then the fork.

The local checks run in the caller's process so their errors reach the terminal as one
sentence; the daemon is forked before trio, threads, SQLite, diskcache or an S3 client exist
(none survive a fork), reaches the store, and reports over a pipe whether the mount serves, or
why not (one sentence, with its exit code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import NoReturn

from ..cachedir import CacheDir
from ..config import MountConfig, default_cache_dir, default_view_cache_dir
from ..daemon.metrics import parse_address
from ..daemon.preflight import check_cache_location, check_fuse
from ..daemon.serve import Daemon, run_daemon
from ..daemon.view import ViewDaemon
from ..errors import MountError, UsageError, WsfsError
from ..runtime import canonical_mountpoint, is_mountpoint
from ..store import open_store
from .handover import wait_for_previous_daemon

log = logging.getLogger(__name__)


def check_mountpoint(cfg: MountConfig) -> None:
    mp = cfg.mountpoint
    if is_mountpoint(mp):
        try:
            mp.stat()
        except OSError as e:  # a FUSE mount whose daemon died: ENOTCONN on every look
            raise MountError(
                f"{mp} is a dead mount ({e.strerror}): its daemon is gone; run `wsfs unmount "
                f"{mp}` (or `fusermount3 -uz {mp}`), then mount again with the same "
                "--cache-dir to upload what it left") from None
        raise MountError(f"{mp} is already mounted; unmount it first (`wsfs unmount {mp}`)")
    if not mp.exists():
        raise MountError(f"the mountpoint {mp} does not exist; create it with `mkdir -p {mp}`")
    if not mp.is_dir():
        raise MountError(f"the mountpoint {mp} is not a directory")
    if not cfg.nonempty and any(mp.iterdir()):
        raise MountError(
            f"the mountpoint {mp} is not empty; empty it or pass -o nonempty to hide its files"
        )


def check_read_only(cfg: MountConfig) -> None:
    """`--at` mounts read-only; a read-only mount takes no lease and creates nothing."""
    if cfg.at is not None:
        cfg.read_only = True
    if cfg.read_only and cfg.init:
        raise UsageError("a read-only mount cannot create a workspace; drop --init (or ro)")
    if cfg.read_only and cfg.force:
        raise UsageError("a read-only mount takes no lease, so --force has nothing to take "
                         "over; drop it")


def check_cache_dir(cfg: MountConfig) -> tuple[Path, bool]:
    """The cache dir, made (0700) if missing and private if it was not; and whether this
    mount made it. Where it would live is checked before anything is created there."""
    cache = cfg.cache_dir or (default_view_cache_dir(cfg.store_url, cfg.mountpoint)
                              if cfg.read_only else default_cache_dir(cfg.store_url))
    cache = cache.absolute()
    mp = cfg.mountpoint
    if cache == mp or mp in cache.parents:
        raise MountError(f"the cache dir {cache} must not be inside the mountpoint {mp}")
    check_cache_location(cache)  # first: looking inside a dead mount fails with ENOTCONN
    check_cache_kind(cache, cfg)
    made = not cache.exists()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe_file = CacheDir(cache).write_test
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as e:
        raise MountError(
            f"the cache dir {cache} is not writable ({e.strerror}); choose another --cache-dir"
        ) from None
    make_private(cache)
    return cache, made


def check_cache_kind(cache: Path, cfg: MountConfig) -> None:
    """A read-only mount never uses a writer's cache dir (it holds what no checkpoint has
    yet, and the next writable mount must find it as it was), nor a writer a read-only
    mount's (cachedir.py)."""
    dirs = CacheDir(cache)
    if cfg.read_only and dirs.meta_db.exists():
        raise MountError(f"the cache dir {cache} is a read-write mount's; a read-only mount "
                         "needs one of its own: leave --cache-dir out, or name a new directory")
    if not cfg.read_only and dirs.view.exists():
        raise MountError(f"the cache dir {cache} is a read-only mount's; mount read-write with "
                         "a cache dir of its own: leave --cache-dir out, or name a new directory")
    if cfg.read_only and dirs.view.exists():
        try:
            store = json.loads(dirs.view.read_text()).get("store")
        except (OSError, ValueError):
            store = None
        if store is not None and store != cfg.store_url:
            raise MountError(f"the cache dir {cache} is a read-only mount's of {store}, not "
                             f"{cfg.store_url}; leave --cache-dir out, or name a new directory")


def make_private(cache: Path) -> None:
    """Close the cache dir to other users: it holds every file name, the data and the logs.

    The directory is the boundary (as ~/.ssh is): files inside one that is 0700 cannot be
    reached by others whatever their own modes, so an older cache dir is tightened, not
    walked file by file. The daemon creates its files 0600 (umask 077) all the same.
    """
    mode = stat.S_IMODE(cache.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        cache.chmod(0o700)
    except OSError as e:
        raise MountError(
            f"the cache dir {cache} is open to other users (mode {mode:04o}) and cannot be "
            f"made private ({e.strerror}); run `chmod 700 {cache}` or choose another "
            "--cache-dir") from None
    log.warning("the cache dir %s was open to other users (mode %04o): made it 0700",
                cache, mode)


def check_metrics_address(address: str) -> None:
    """Refuse a --metrics address that cannot be served (malformed, unknown host, port in use)
    before anything else happens; the daemon binds it for good before it takes the lease."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
    except OSError as e:
        raise MountError(f"cannot serve metrics on {address}: {e.strerror or e}; choose "
                         "another --metrics address") from None


def prepare(cfg: MountConfig) -> tuple[Path, bool]:
    """Every local check that can fail before a daemon starts, so errors reach the terminal;
    the cache dir (and whether this mount made it) once all have passed.

    The cache dir is made last, when nothing else is left to refuse; a previous daemon still
    uploading from it is waited for (handover.py). The store is only
    checked for a well-formed URL here; the daemon reaches it (the store answers, the
    workspace exists) before it takes the lease or writes into the cache dir, and reports any
    failure over the ready pipe with its exit code, as one sentence like these. Reaching it
    here too made every mount pay twice for an S3 client and two round trips.
    """
    check_read_only(cfg)
    if cfg.metrics:
        check_metrics_address(cfg.metrics)
    open_store(cfg.store_url, endpoint_url=cfg.endpoint_url, region=cfg.region)
    check_fuse()
    cfg.mountpoint = canonical_mountpoint(cfg.mountpoint)
    check_mountpoint(cfg)
    cache_dir, made = check_cache_dir(cfg)
    wait_for_previous_daemon(cache_dir, cfg.handover_timeout)
    return cache_dir, made


def daemon_kind(cfg: MountConfig) -> type[Daemon]:
    """A read-only mount's daemon takes no lease and serves a checkpoint (daemon/view.py)."""
    return ViewDaemon if cfg.read_only else Daemon


def mount(cfg: MountConfig) -> None:
    """`wsfs mount`: returns once the filesystem serves (or serves until unmounted)."""
    cache_dir, made = prepare(cfg)
    if cfg.foreground:
        run_daemon(cfg, cache_dir, None, made, kind=daemon_kind(cfg))
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        code = 0
        try:
            run_daemon(cfg, cache_dir, write_end, made, kind=daemon_kind(cfg))
        except SystemExit as e:
            code = int(e.code or 0)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    if not chunks:
        _, status = os.waitpid(pid, 0)
        raise MountError(f"the wsfs daemon died while starting (status {status}); see "
                         f"{cache_dir / 'wsfs.log'}")
    msg = json.loads(b"".join(chunks))
    if not msg["ok"]:
        os.waitpid(pid, 0)
        err = WsfsError(msg["message"])
        err.exit_code = msg["code"]
        raise err


def exit_parent(code: int = 0) -> NoReturn:
    """End the `wsfs mount` process once the daemon serves, skipping the interpreter's teardown.

    With trio, pyfuse3, botocore and SQLite imported (the daemon needs them before the fork), a
    normal exit spends 0.1-0.2 s tearing down modules that nothing will use again, and the
    caller (a shell about to `ls` the mount) waits for it. Only our own output needs flushing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code)
