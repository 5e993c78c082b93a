"""Shared test harness: real S3 servers on 127.0.0.1 and real FUSE mounts of wsfs.

Every mount is made by the real command line (`python -m wsfs mount`, which daemonizes) and
always torn down: `fusermount3 -u`, then `-uz`, then SIGKILL of the daemon. A test fails if a
daemon logged an error or a traceback it did not expect.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from faultproxy import FaultProxy
from s3servers import S3Server, start_moto, start_rclone

from wsfs.blocks.journal import Journal
from wsfs.cachedir import CacheDir
from wsfs.runtime import force_unmount, is_mountpoint, mounts, pid_alive

WSFS = [sys.executable, "-m", "wsfs"]


def run_wsfs(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the wsfs command line; on failure show its output in the assertion."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("WSFS_RUN_DIR", "/tmp/wsfs-test-run")
    result = subprocess.run([*WSFS, *args], capture_output=True, text=True, env=full_env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"wsfs {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def abort_fuse_connection(path: Path) -> None:
    """Last resort for a daemon stuck in the kernel on its own mount (SIGKILL cannot end a
    thread waiting for the FUSE connection it serves): abort the connection, as
    `echo 1 > /sys/fs/fuse/connections/N/abort` does by hand; the mountpoint is never
    stat'ed (that could hang too)."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):  # fusectl is not mounted everywhere
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)],
                       capture_output=True, timeout=30)
    for m in mounts():
        if m.mountpoint == path:
            with contextlib.suppress(OSError):
                (connections / m.device.split(":")[1] / "abort").write_text("1")


class Workspace:
    """One workspace in one store, mounted and unmounted by the real command line."""

    def __init__(self, root: Path, store_url: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.store_url = store_url
        self.env = {"WSFS_RUN_DIR": str(root / "run"), **(env or {})}
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache_dir = root / "cache-0"
        self._caches = 0
        self.allowed_log_errors: list[str] = []

    def wsfs(self, *args: str, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        return run_wsfs(*args, env=self.env, check=check, timeout=timeout)

    def init(self, *extra: str) -> None:
        self.wsfs("init", self.store_url, *extra)

    def mount(self, *extra: str, cache_dir: Path | None = None,
              flush_delay: float = 1.0) -> Path:
        if cache_dir is not None:
            self.cache_dir = cache_dir
        self.wsfs("mount", self.store_url, str(self.mnt), "--cache-dir", str(self.cache_dir),
                  "--flush-delay", str(flush_delay), *extra)
        assert is_mountpoint(self.mnt)
        return self.mnt

    @property
    def cache(self) -> CacheDir:
        """The paths in the cache dir of the current (or last) mount."""
        return CacheDir(self.cache_dir)

    def fresh_cache(self) -> Path:
        """A new, empty cache dir: the next mount behaves like one on a fresh machine."""
        self._caches += 1
        self.cache_dir = self.root / f"cache-{self._caches}"
        return self.cache_dir

    def unmount(self) -> None:
        self.wsfs("unmount", str(self.mnt), timeout=300)
        assert not is_mountpoint(self.mnt)
        self.check_log()

    def remount(self, *, wipe_cache: bool = True, **kw: object) -> Path:
        self.unmount()
        if wipe_cache:
            self.fresh_cache()
        return self.mount(**kw)  # type: ignore[arg-type]

    def status(self) -> dict[str, Any]:
        """The daemon's status.json, as parsed: its values are whatever JSON holds."""
        return dict(json.loads(self.cache.status.read_text()))

    def daemon_pid(self) -> int | None:
        try:
            return int(self.status()["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (SIGKILL: a crash) and clear the dead mount away."""
        pid = self.daemon_pid()
        assert pid is not None
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            wait_pid_gone(pid)
            force_unmount(self.mnt)

    def check_log(self) -> None:
        log = self.cache.log
        if not log.exists():
            return
        bad = [line for line in log.read_text().splitlines()
               if (" ERROR " in line or "Traceback" in line)
               and not any(a in line for a in self.allowed_log_errors)]
        assert not bad, "the daemon logged errors:\n" + "\n".join(bad[:20])

    def teardown(self) -> None:
        pid = self.daemon_pid()
        force_unmount(self.mnt)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                if not until(lambda: not pid_alive(pid), timeout=20):
                    os.kill(pid, signal.SIGKILL)


def not_refused_as_read_only(attempts: dict[str, Callable[[], object]]) -> list[str]:
    """The names of the `attempts` (writes tried on a read-only mount) that did not fail with
    EROFS: [] when the mount refused them all."""
    let_through = []
    for what, attempt in attempts.items():
        try:
            attempt()
        except OSError as e:
            if e.errno == errno.EROFS:
                continue
        let_through.append(what)
    return let_through


def wait_pid_gone(pid: int, timeout: float = 30) -> None:
    wait_for(f"process {pid} to exit", lambda: not pid_alive(pid), timeout)


def lose_unsynced_writes(cache_dir: Path, *, delete_new: frozenset[str] = frozenset()
                         ) -> list[tuple[str, int, bytes]]:
    """What a machine crash does to the writes the journal covers: zero each record's bytes
    in its block's file (the files in `delete_new` disappear whole). Returns the records."""
    j = Journal(CacheDir(cache_dir).journal)
    try:
        records = j.records()
    finally:
        j.close()
    for block_id, offset, data in records:
        path = CacheDir(cache_dir).dirty / block_id
        if block_id in delete_new:
            path.unlink(missing_ok=True)
        elif path.exists():
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(bytes(len(data)))
    return records


# -- waiting: on a condition with a deadline, never on a bare sleep ----------------------

POLL = 0.05  # seconds between two looks at a condition


def until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll `cond` until it holds (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 60) -> None:
    """Poll `cond` until it holds; fail naming `what` after `timeout` seconds."""
    assert until(cond, timeout), f"timed out waiting for {what}"


async def trio_wait_for(what: str, cond: Callable[[], bool], timeout: float = 10) -> None:
    """wait_for inside trio.run: the other tasks (and the threads they wait on) run between
    two looks at `cond`."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(POLL / 5)
        return
    raise AssertionError(f"timed out waiting for {what}")


# -- tiers (see tests/README.md) ----------------------------------------------------------

# The tiers, fastest first; each test is in exactly one. The first four need neither root nor
# FUSE: `python -m pytest -m 'not mount and not crash and not slow'` runs them in seconds.
FAST_TIERS = ("store", "layers", "ops", "cli")
TIERS = (*FAST_TIERS, "mount", "crash")

# Fixtures that hand a test a Workspace, which only the real command line mounts.
MOUNT_FIXTURES = frozenset({"ws", "mounted", "any_ws", "proxied", "shared"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test its tier: its own mark or its module's (`pytestmark`), else `mount`.

    A test that claims no tier is assumed to need root and FUSE, so that the fast tiers never
    pick up a test that cannot run there; one that uses a mount fixture while marked with a
    fast tier is an error, not a silent skip."""
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked with tiers {sorted(tiers)}: "
                                    "give it one")
        mounts = MOUNT_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if tiers & set(FAST_TIERS) and mounts:
            raise pytest.UsageError(f"{item.nodeid} is marked {tiers.pop()} but uses the fixture "
                                    f"{sorted(mounts)[0]}, which mounts: mark it mount")
        if not tiers:
            item.add_marker(pytest.mark.mount)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Without root, say once which tests cannot run, instead of failing each of them."""
    if os.geteuid() == 0 or session.config.option.collectonly:
        return
    mounting = sum(1 for item in session.items
                   if item.get_closest_marker("mount") or item.get_closest_marker("crash"))
    if mounting:
        pytest.exit(f"{mounting} of the selected tests mount (tiers mount and crash) and need "
                    "root and /dev/fuse: run them as root, or run the fast tiers with "
                    "-m 'not mount and not crash and not slow'", returncode=4)


# -- servers (started once per session, stopped at its end) -------------------------------

SMALL_DISK = 64 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A SMALL_DISK tmpfs (for a cache dir that fills up), unmounted at the end (lazily if a
    daemon still holds it)."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(d)],
                   check=True)
    yield d
    if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_rclone(tmp_path_factory.mktemp("rclone-root"))
    yield server
    server.stop()


def s3_workspace(server: S3Server, root: Path) -> Workspace:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    return Workspace(root, f"s3://{bucket}/ws", env=server.env())


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    """An initialised workspace on the embedded file:// store, not yet mounted."""
    w = Workspace(tmp_path, f"file://{tmp_path / 'store'}")
    w.init()
    yield w
    w.teardown()


@pytest.fixture
def mounted(ws: Workspace) -> Iterator[Workspace]:
    """The `ws` workspace, mounted."""
    ws.mount()
    yield ws


@pytest.fixture(params=["file", "moto", "rclone"])
def any_ws(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Workspace]:
    """An initialised workspace on each kind of store: file://, moto and rclone serve s3."""
    if request.param == "file":
        w = Workspace(tmp_path, f"file://{tmp_path / 'store'}")
    else:
        server = request.getfixturevalue(f"{request.param}_server")
        w = s3_workspace(server, tmp_path)
    w.init()
    yield w
    w.teardown()


@pytest.fixture
def proxied(moto_server: S3Server, tmp_path: Path) -> Iterator[tuple[Workspace, FaultProxy]]:
    """An initialised workspace in moto, reached only through a fault proxy."""
    proxy = FaultProxy(moto_server.endpoint_url).start()
    w = s3_workspace(moto_server, tmp_path)
    w.env["AWS_ENDPOINT_URL"] = proxy.url
    w.init()
    yield w, proxy
    proxy.pass_through()
    w.teardown()
    proxy.stop()
