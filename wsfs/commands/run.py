"""`wsfs run`: the container entrypoint that owns /workspace for the notebook's whole life.

It mounts the workspace, prepares /data as a plain local directory, runs the notebook command as
its child and forwards signals to it. On SIGTERM (what `docker stop` and Kubernetes send) it
asks the daemon to upload everything dirty at once, while it stops the child (SIGTERM, then
SIGKILL after `--stop-timeout`); then it unmounts, waits for the daemon's final flush, and exits
0 — or 7 if the flush failed. The platform SIGKILLs everything a fixed time after its SIGTERM
(Docker 10 s, Kubernetes 30 s): the upload must not wait for the child. If the child exits by
itself, the same unmount follows and the entrypoint exits with the child's status.

The entrypoint may be PID 1: it handles every signal it cares about (the kernel drops unhandled
signals sent to PID 1) and reaps every orphan, like tini. Secrets stay in the environment or in
a 0600 file: never on a command line, never in a log, and by default not in the child's
environment either.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from types import FrameType

from ..cachedir import CacheDir
from ..daemon.control import SyncRequest
from ..errors import (
    CommandNotExecutable,
    CommandNotFound,
    FlushError,
    MountError,
    UsageError,
    WsfsError,
)
from ..progress import human_bytes
from ..runtime import canonical_mountpoint, daemon_alive, mount_of, syncfs
from . import options

log = logging.getLogger(__name__)

# Signals passed on to the notebook as they are; SIGTERM means "stop the container".
FORWARDED = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGWINCH)
# Variables that carry S3 credentials: the daemon needs them, the notebook must not see them.
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_SECURITY_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "WSFS_CREDENTIALS_FILE")
PR_SET_CHILD_SUBREAPER = 36
PROGRESS_EVERY = 2.0  # seconds between two progress lines while flushing
# The child's grace after SIGTERM: short enough that child stop, flush and unmount fit in
# Docker's 10 s together (the upload runs from the SIGTERM on, in parallel with the stop).
DEFAULT_STOP_TIMEOUT = "3"
SYNC_EVERY = 1.0  # at most one early-flush request a second while the command stops


USAGE = "wsfs run --mount STORE MOUNTPOINT [--data-dir DIR] [mount options] -- COMMAND..."


def arguments(sp: argparse.ArgumentParser) -> None:
    """`wsfs run`'s arguments: its own, and every option of `wsfs mount` as it is."""
    sp.add_argument("--mount", nargs=2, required=True, metavar=("STORE", "MOUNTPOINT"),
                    help="the workspace to mount and where")
    sp.add_argument("--data-dir", default="/data", metavar="DIR",
                    help="plain local directory to create for the notebook (never mounted or "
                    "uploaded); '' for none")
    sp.add_argument("--data-owner", default=None, metavar="UID:GID",
                    help="chown the data dir to this owner (unset: left as it is)")
    sp.add_argument("--stop-timeout", default=DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                    help="seconds COMMAND may take to exit after SIGTERM before SIGKILL; the "
                    "workspace's upload starts at the SIGTERM, alongside")
    sp.add_argument("--keep-credentials", action="store_true",
                    help="also pass the AWS credential variables to COMMAND, which otherwise "
                    "does not see them")
    options.add_mount_options(sp)
    sp.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="the notebook command and its arguments")


def fstype_of(path: Path) -> str:
    """The filesystem type of the mount that holds `path` (longest matching mountpoint)."""
    where = mount_of(path.resolve())
    return "?" if where is None else where.fstype


def prepare_data_dir(data_dir: Path, mountpoint: Path, owner: str | None) -> None:
    """Create /data as an ordinary local directory, outside the workspace and any wsfs mount."""
    data = canonical_mountpoint(data_dir)  # (resolved like the mountpoint, to compare)
    mp = canonical_mountpoint(mountpoint)
    if data == mp or mp in data.parents or data in mp.parents:
        raise UsageError(f"the data dir {data} and the workspace {mp} must not contain each "
                         "other; pick separate directories")
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MountError(f"cannot create the data dir {data} ({e.strerror}); "
                         "choose another --data-dir") from None
    if fstype_of(data).startswith("fuse.wsfs"):
        raise UsageError(f"the data dir {data} is on a wsfs mount; it must be local disk")
    if owner:
        from .options import parse_owner

        try:
            os.chown(data, *parse_owner(owner, "--data-owner"))
        except OSError as e:
            raise MountError(f"cannot give the data dir {data} to {owner} ({e.strerror}); "
                             "run as root, or leave --data-owner out") from None
    log.info("data dir %s is plain local disk (%s)", data, fstype_of(data))


class EarlyFlush:
    """Uploads the workspace's changes while the command stops, instead of after it.

    `wsfs sync`'s request (wsfs.daemon.control), not waited for: at SIGTERM the kernel hands
    over its cached pages (`sync -f`, syncfs(2)) and the daemon starts a flush cycle at once.
    While the command is still stopping, each answer is followed by a new round (at most one
    every SYNC_EVERY seconds), so what it writes while it stops is on its way too, and the
    final flush at unmount has little left to do. Each step is a child process or a request file
    that the supervisor's loop looks at between two signals (`poll`): nothing here blocks
    it, and no thread is needed.
    """

    def __init__(self, mountpoint: Path, daemon_pid: int, cache_dir: Path) -> None:
        self.mountpoint = mountpoint
        self.daemon_pid = daemon_pid
        self.cache_dir = cache_dir
        self.requests = 0
        self._syncing: subprocess.Popen[bytes] | None = None
        self._request: SyncRequest | None = None
        self._round_started = 0.0
        self._done = False
        self._warned = False

    def poll(self) -> None:
        """Take the next step if the current one is over: syncfs, then the request, then a
        pause until the next round."""
        if self._done:
            return
        if self._syncing is not None:
            if self._syncing.poll() is None:
                return
            self._syncing = None
            self._send_request()
        if self._request is not None:
            answer = self._request.answer()
            if answer is None:
                return
            self._request.cancel()
            self._request = None
            if not answer[0] and not self._warned:
                log.warning("the upload at SIGTERM failed (%s); the final flush retries",
                            answer[1])
                self._warned = True
        if not self._done and time.monotonic() >= self._round_started + SYNC_EVERY:
            self._round_started = time.monotonic()
            self._syncing = subprocess.Popen(["sync", "-f", str(self.mountpoint)],
                                             stdin=subprocess.DEVNULL)

    def _send_request(self) -> None:
        request = SyncRequest(self.cache_dir)
        try:
            request.send(self.daemon_pid)
        except OSError as e:  # the daemon is gone: the supervisor reports it
            log.warning("cannot ask the daemon to flush: %s", e)
            request.cancel()
            self._done = True
            return
        self.requests += 1
        self._request = request

    def finish(self, timeout: float = 10.0) -> None:
        """Stop asking (the unmount's own flush takes over); let a syncfs in progress end."""
        self._done = True
        if self._request is not None:
            self._request.cancel()
        if self._syncing is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._syncing.wait(timeout)


class DaemonDied(MountError):
    """The daemon serving the workspace died under the running command."""


class Supervisor:
    """The child, the signals, and the mount's final flush."""

    def __init__(self, mountpoint: Path, daemon_pid: int, cache_dir: Path,
                 daemon_start: int | None = None) -> None:
        self.mountpoint = mountpoint
        self.daemon_pid = daemon_pid
        self.daemon_start = daemon_start
        self.cache_dir = cache_dir
        self.pending: deque[int] = deque()
        self.child: subprocess.Popen[bytes] | None = None
        self.child_status: int | None = None
        self.early_flush: EarlyFlush | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def install_signals(self) -> None:
        """Record signals instead of dying of them (PID 1 has no default actions anyway)."""
        for sig in (signal.SIGTERM, signal.SIGCHLD, *FORWARDED):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def wait_for_event(self, timeout: float) -> None:
        """Wait for a signal (a child's exit too) or `timeout` seconds, then let the early
        flush take its next step."""
        select.select([self.wake_r], [], [], timeout)
        if self.early_flush is not None:
            self.early_flush.poll()
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # -- processes --------------------------------------------------------------------------

    def start_child(self, command: list[str], env: dict[str, str]) -> None:
        """Run the notebook in its own process group, so signals reach all of its processes."""
        try:
            self.child = subprocess.Popen(command, env=env, process_group=0)
        except FileNotFoundError:
            raise CommandNotFound(f"command not found: {command[0]!r}; check its name and "
                                  "PATH") from None
        except OSError as e:  # found, but EACCES, ENOEXEC, ...: a shell's 126
            raise CommandNotExecutable(f"cannot run {command[0]!r} ({e.strerror}); it must be "
                                       "an executable file (chmod +x; a script needs a #! "
                                       "line)") from None
        log.info("started %s (pid %d)", command[0], self.child.pid)
        if os.isatty(0):  # give the terminal to the child, as a shell would
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            try:
                with contextlib.suppress(OSError):
                    os.tcsetpgrp(0, self.child.pid)
            finally:
                signal.signal(signal.SIGTTOU, old)

    def reap(self) -> None:
        """Collect every exited child: ours, the daemon, and orphans handed to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_status = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.child_status
                if self.child_status < 0:
                    log.info("the command was killed by %s",
                             signal.Signals(-self.child_status).name)
                else:
                    log.info("the command exited with status %d", self.child_status)

    def child_alive(self) -> bool:
        self.reap()
        return self.child is not None and self.child_status is None

    def signal_child(self, sig: int) -> None:
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pid, sig)

    def stop_child(self, grace: float) -> None:
        """SIGTERM to the child's group, SIGKILL after `grace` seconds."""
        if self.child_alive():
            log.info("stopping the command: SIGTERM, SIGKILL in %.0fs", grace)
            self.signal_child(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.child_alive() and time.monotonic() < deadline:
                self.wait_for_event(0.1)
            if self.child_alive():
                log.warning("the command did not stop within %.0fs: SIGKILL", grace)
        # Whatever is left of its process group would keep files open in the workspace.
        self.signal_child(signal.SIGKILL)
        while self.child_alive():
            self.wait_for_event(0.1)

    def daemon_alive(self) -> bool:
        """Whether the daemon runs: its pid and that process's start time (once reaped, its
        pid may be a notebook process's)."""
        self.reap()
        return daemon_alive(self.daemon_pid, self.daemon_start)

    # -- the main loop ----------------------------------------------------------------------

    def supervise(self, grace: float) -> int | None:
        """Run until the child exits (its status) or SIGTERM stops it (None)."""
        while True:
            while self.pending:
                sig = self.pending.popleft()
                if sig == signal.SIGTERM:
                    log.info("got SIGTERM: uploading the workspace's changes now, while the "
                             "command stops")
                    self.early_flush = EarlyFlush(self.mountpoint, self.daemon_pid,
                                                  self.cache_dir)
                    self.early_flush.poll()
                    self.stop_child(grace)
                    return None
                if sig != signal.SIGCHLD:
                    self.signal_child(sig)
            if not self.child_alive():
                assert self.child_status is not None
                self.signal_child(signal.SIGKILL)  # leftovers of its process group
                return self.child_status
            if not self.daemon_alive():
                log.error("the wsfs daemon died; see %s; stopping the command",
                          CacheDir(self.cache_dir).log)
                self.stop_child(grace)
                raise DaemonDied(
                    f"the wsfs daemon serving {self.mountpoint} died; its unsaved changes "
                    f"stay in {self.cache_dir} and the next mount with that cache dir uploads "
                    f"them (see {CacheDir(self.cache_dir).log})")
            self.wait_for_event(1.0)

    def unmount(self) -> None:
        """`wsfs unmount`: sync, unmount, wait for the daemon's last upload, logging progress."""
        from ..runtime import is_mountpoint

        mp = str(self.mountpoint)
        if self.early_flush is not None:
            self.early_flush.finish()
        if is_mountpoint(self.mountpoint):
            log.info("unmounting %s", mp)
            try:
                syncfs(mp)
            except OSError as e:
                log.warning("syncfs(%s) failed: %s", mp, e)
            for attempt in range(10):
                result = subprocess.run(["fusermount3", "-u", mp], capture_output=True,
                                        text=True)
                if result.returncode == 0 or not is_mountpoint(self.mountpoint):
                    break
                log.warning("fusermount3 -u %s failed (attempt %d): %s", mp, attempt + 1,
                            result.stderr.strip())
                self.wait_for_event(1.0)
            else:
                log.warning("files in %s are still open: asking the daemon to unmount", mp)
                os.kill(self.daemon_pid, signal.SIGTERM)
        layout = CacheDir(self.cache_dir)
        next_report = time.monotonic()
        status: dict[str, object] = {}
        while self.daemon_alive():
            status = layout.read_status() or status
            if time.monotonic() >= next_report and status:
                log.info("flushing: %s in %s blocks left, %s blocks uploaded, "
                         "checkpoint %s", human_bytes(int(str(status.get("dirty_bytes", 0)))),
                         status.get("dirty_blocks"), status.get("uploaded_blocks"),
                         status.get("checkpoint"))
                next_report = time.monotonic() + PROGRESS_EVERY
            self.pending.clear()  # further SIGTERMs: the flush goes on
            self.wait_for_event(0.2)
        status = layout.read_status() or status
        if status.get("state") != "done":
            raise FlushError.stopped_early(status, self.cache_dir)
        log.info("every block is in the store (checkpoint %s); %s is unmounted",
                 status.get("checkpoint"), mp)


def child_env(keep_credentials: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not keep_credentials:
        for name in SECRET_VARS:
            env.pop(name, None)
    return env


def show_progress() -> None:
    """The entrypoint's own lines (mount, stop, flush progress) always reach the container log."""
    from ..logs import formatter

    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter(stream=True))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(min(logging.getLogger().getEffectiveLevel(), logging.INFO))


def run(args: argparse.Namespace) -> int:
    """`wsfs run`: see the module docstring."""
    from ..runtime import registry_path
    from .credentials import use_credentials
    from .mount import mount
    from .options import parse_seconds

    show_progress()
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("wsfs run needs the command to run after `--`, e.g. "
                         "`wsfs run --mount STORE /workspace -- jupyter lab`")
    grace = parse_seconds(args.stop_timeout, "--stop-timeout")
    args.store, mountpoint = args.mount
    args.mountpoint = canonical_mountpoint(Path(mountpoint))
    args.foreground = False
    cfg = options.mount_config(args)
    use_credentials(cfg.credentials_file, cfg.profile)
    if args.data_dir:  # a str: Path("") would be the working directory
        prepare_data_dir(Path(args.data_dir), args.mountpoint, args.data_owner)

    if os.getpid() != 1:  # orphans of the notebook come to us, as they would to PID 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # A SIGTERM while mounting must not kill us with a daemon left behind: record it.
    early: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: early.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    log.info("mounting %s on %s", cfg.store_url, cfg.mountpoint)
    try:
        mount(cfg)
    except BaseException:
        for s, h in previous.items():
            signal.signal(s, h)
        raise
    reg = json.loads(registry_path(cfg.mountpoint).read_text())
    sup = Supervisor(cfg.mountpoint, int(reg["pid"]), Path(reg["cache_dir"]),
                     reg.get("pid_start"))
    # Straight from the recording handlers to the supervisor's: as PID 1, a signal that
    # found its default handler in between would be dropped by the kernel, and with a
    # SIGTERM the final flush.
    sup.install_signals()
    sup.pending.extend(early)
    log.info("mounted (daemon pid %d, cache %s)", sup.daemon_pid, sup.cache_dir)

    status: int | None = None
    try:
        if signal.SIGTERM not in early:
            sup.start_child(command, child_env(args.keep_credentials))
            status = sup.supervise(grace)
    except DaemonDied:
        # Nothing left to flush from here: clear the dead mount away for the next start.
        subprocess.run(["fusermount3", "-uz", str(cfg.mountpoint)], capture_output=True)
        raise
    except BaseException:
        sup.unmount()
        raise
    try:
        sup.unmount()
    except WsfsError as e:
        log.error("%s", e)
        raise
    if status is None:
        log.info("stopped cleanly")
        return 0
    return status if status >= 0 else 128 - status

