"""A failed start leaves nothing behind, and the cache dir is private.

Every check that can refuse a mount (the --metrics address, /dev/fuse, CAP_SYS_ADMIN, where
the cache dir lives) runs before the lease is taken or anything is written: the store keeps no
lease (no "unclean stop", `wsfs gc` not refused, no other host kept waiting) and no cache dir
appears. A failure after the lease (the kernel refusing the mount) gives it back. Each case
runs the real command line; the machine's own /dev and capabilities are changed only inside a
private mount namespace (`unshare -m`) or a child's capability sets (`setpriv`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, run_wsfs, wait_for, wait_pid_gone
from test_badinput import attempt, check_refused, mount_args

from wsfs.cachedir import CacheDir
from wsfs.config import default_cache_dir
from wsfs.daemon import preflight
from wsfs.daemon.preflight import in_container
from wsfs.daemon.workspace import stopped_cleanly
from wsfs.errors import MountError, NoWorkspaceError, UsageError
from wsfs.runtime import Mount, is_mountpoint

TIMEOUT = 60


def lease_of(ws: Workspace) -> dict[str, object] | None:
    path = Path(ws.store_url.removeprefix("file://")) / "lease"
    return dict(json.loads(path.read_bytes())) if path.exists() else None


def assert_nothing_left(ws: Workspace, cache: Path) -> None:
    """No lease in the store, the workspace idle for `wsfs ls`, no cache dir made."""
    assert lease_of(ws) is None, "a refused mount must not leave a lease in the store"
    rows = json.loads(ws.wsfs("ls", ws.store_url, "--json").stdout)
    assert [r["stale_lease"] for r in rows] == [False], rows
    assert not cache.exists(), f"a refused mount left {sorted(cache.rglob('*'))}"
    assert not is_mountpoint(ws.mnt)


# -- checks before the lease --------------------------------------------------------------------

@pytest.mark.parametrize(("address", "code", "words"), [
    ("localhost", UsageError.exit_code, "must be HOST:PORT"),
    ("localhost:99999", UsageError.exit_code, "must be HOST:PORT"),
    ("no-such-host.invalid:9100", MountError.exit_code, "cannot serve metrics"),
    ("busy", MountError.exit_code, "cannot serve metrics"),
])
def test_bad_metrics_address_refused_before_the_lease(ws: Workspace, address: str, code: int,
                                                      words: str) -> None:
    cache = ws.root / "fresh-cache"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if address == "busy":
            address = f"127.0.0.1:{busy.getsockname()[1]}"
        r = attempt(ws, *mount_args(ws, "--cache-dir", str(cache), "--metrics", address))
    check_refused(r, code, words, mnt=ws.mnt)
    assert_nothing_left(ws, cache)


def test_an_existing_cache_dir_untouched_by_a_refused_mount(ws: Workspace) -> None:
    ws.mount()
    ws.unmount()
    before = {p: p.stat().st_mtime_ns for p in ws.cache_dir.rglob("*")}
    r = attempt(ws, *mount_args(ws, "--metrics", "localhost"))
    check_refused(r, UsageError.exit_code, "HOST:PORT", mnt=ws.mnt)
    assert {p: p.stat().st_mtime_ns for p in ws.cache_dir.rglob("*")} == before
    assert lease_of(ws) is None


def test_a_store_refusing_writes_nothing_into_the_cache_dir(ws: Workspace, tmp_path: Path
                                                            ) -> None:
    """The store is reached (and the workspace read) before the daemon writes its log or
    lock: a cache dir made ready by hand (a volume, say) stays empty."""
    cache = tmp_path / "volume"
    cache.mkdir(mode=0o700)
    r = attempt(ws, *mount_args(ws, "--cache-dir", str(cache),
                                store=f"file://{tmp_path / 'no-workspace'}"))
    check_refused(r, NoWorkspaceError.exit_code, "wsfs init", mnt=ws.mnt)
    assert list(cache.iterdir()) == []


def test_a_foreground_start_fails_in_one_line(ws: Workspace, tmp_path: Path) -> None:
    """`wsfs mount -f` (systemd's way) runs the daemon in the command's own process: a start
    refused by the store is said once, not also as an ERROR log line."""
    cache = ws.root / "fresh-cache"
    r = attempt(ws, *mount_args(ws, "-f", "--cache-dir", str(cache),
                                store=f"file://{tmp_path / 'no-workspace'}"))
    check_refused(r, NoWorkspaceError.exit_code, "wsfs init", mnt=ws.mnt)
    assert not cache.exists()


def in_namespace(script: str, ws: Workspace, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `script`, then `argv`, in a private mount namespace of their own."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    env = {**os.environ, **ws.env}
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec",
                           f'{script}\nexec "$@"', "sh", *argv],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT)


def test_missing_dev_fuse(ws: Workspace) -> None:
    """A container started without --device /dev/fuse: one sentence with the fix."""
    cache = ws.root / "fresh-cache"
    r = in_namespace("mount -t tmpfs none /dev; mknod -m 666 /dev/null c 1 3", ws,
                     *WSFS, *mount_args(ws, "--cache-dir", str(cache)))
    fix = "--device /dev/fuse --cap-add SYS_ADMIN" if in_container() else "modprobe fuse"
    check_refused(r, MountError.exit_code, "/dev/fuse is missing", fix, mnt=ws.mnt)
    assert_nothing_left(ws, cache)


def test_dev_fuse_that_cannot_be_opened(ws: Workspace) -> None:
    """/dev/fuse there but no FUSE device behind it (a node made by hand with a wrong
    number; a device cgroup that denies it fails the same way)."""
    cache = ws.root / "fresh-cache"
    r = in_namespace("mount -t tmpfs none /dev; mknod -m 666 /dev/null c 1 3; "
                     "mknod -m 666 /dev/fuse c 10 254", ws,
                     *WSFS, *mount_args(ws, "--cache-dir", str(cache)))
    check_refused(r, MountError.exit_code, "/dev/fuse cannot be opened", mnt=ws.mnt)
    assert_nothing_left(ws, cache)


def test_without_cap_sys_admin(ws: Workspace) -> None:
    """A container started without --cap-add SYS_ADMIN: one sentence with the fix."""
    cache = ws.root / "fresh-cache"
    r = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--",
                        *WSFS, *mount_args(ws, "--cache-dir", str(cache))],
                       capture_output=True, text=True, env={**os.environ, **ws.env},
                       timeout=TIMEOUT)
    fix = "--cap-add SYS_ADMIN" if in_container() else "full root privileges"
    check_refused(r, MountError.exit_code, "CAP_SYS_ADMIN", fix, mnt=ws.mnt)
    assert_nothing_left(ws, cache)


def test_without_fusermount3(ws: Workspace, tmp_path: Path) -> None:
    """fuse3 not installed: root could mount without it, but neither `wsfs unmount` nor the
    daemon's own unmount at SIGTERM could undo the mount."""
    cache = ws.root / "fresh-cache"
    bare = tmp_path / "bin"  # a PATH with what the daemon's start needs, but fusermount3
    bare.mkdir()
    r = subprocess.run([*WSFS, *mount_args(ws, "--cache-dir", str(cache))],
                       capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, **ws.env, "PATH": str(bare)})
    check_refused(r, MountError.exit_code, "fusermount3 is missing", "fuse3", mnt=ws.mnt)
    assert_nothing_left(ws, cache)


def test_cache_dir_inside_another_wsfs_mount(ws: Workspace, tmp_path: Path) -> None:
    """Accepted, it would upload the second workspace's cache into the first, which could
    then never be unmounted; refused before anything is written there."""
    first = ws.mount()
    with other_workspace(tmp_path) as other:
        for cache in (first / "cache", first / "deeper" / "cache"):
            r = attempt(other, *mount_args(other, "--cache-dir", str(cache)))
            check_refused(r, MountError.exit_code, f"inside the wsfs mount {first}",
                          mnt=other.mnt)
        # the same store, too: refused for the same reason, not after the lease
        r = attempt(ws, *mount_args(other, "--cache-dir", str(first / "cache"),
                                    store=ws.store_url))
        check_refused(r, MountError.exit_code, "inside the wsfs mount", mnt=other.mnt)
    assert sorted(p.name for p in first.iterdir()) == [".workspace.initialized"]
    ws.unmount()


@contextlib.contextmanager
def other_workspace(tmp_path: Path) -> Iterator[Workspace]:
    """A second workspace, in a store of its own; unmounted at the end whatever happened
    (the old code mounted it with its cache inside the first)."""
    other = Workspace(tmp_path / "other", f"file://{tmp_path / 'store2'}")
    other.init()
    try:
        yield other
    finally:
        other.teardown()


def test_cache_dir_inside_a_dead_wsfs_mount(ws: Workspace, tmp_path: Path) -> None:
    """A wsfs daemon killed leaves its mount dead (ENOTCONN on every look): a cache dir
    inside it is refused in one sentence too, not with a traceback."""
    first = ws.mount()
    pid = ws.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_pid_gone(pid)
    with other_workspace(tmp_path) as other:
        r = attempt(other, *mount_args(other, "--cache-dir", str(first / "cache")))
        check_refused(r, MountError.exit_code, f"inside the wsfs mount {first}",
                      mnt=other.mnt)


def test_mount_over_a_dead_mount(ws: Workspace) -> None:
    """After a crash the mountpoint is a dead mount: mounting again says so, with the fix,
    instead of a traceback; the fix works, and the crash's data is there."""
    mnt = ws.mount()
    with open(mnt / "f", "w") as f:
        f.write("written before the crash")
        f.flush()
        os.fsync(f.fileno())
    pid = ws.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_pid_gone(pid)
    r = attempt(ws, *mount_args(ws))
    check_refused(r, MountError.exit_code, "is a dead mount", f"fusermount3 -uz {mnt}")
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=True, timeout=TIMEOUT)
    assert (ws.mount() / "f").read_text() == "written before the crash"
    ws.unmount()


@pytest.mark.cli
@pytest.mark.parametrize(("fstype", "refused"), [
    ("nfs4", "a network filesystem"), ("cifs", "a network filesystem"),
    ("9p", "a network filesystem"), ("ceph", "a network filesystem"),
    ("fuse.sshfs", "a FUSE filesystem"), ("fuseblk", "a FUSE filesystem"),
    ("overlay", None), ("tmpfs", None), ("ext4", None), ("xfs", None), ("btrfs", None),
])
def test_which_filesystems_may_hold_a_cache_dir(monkeypatch: pytest.MonkeyPatch,
                                                fstype: str, refused: str | None) -> None:
    """Local filesystems (a container's overlay root included) hold a cache dir; FUSE and
    network ones are refused, naming the filesystem. (A real wsfs mount: above.)"""
    where = Mount(Path("/srv"), fstype, "server:/export", "0:50")
    monkeypatch.setattr(preflight, "mount_of", lambda path: where)
    if refused is None:
        preflight.check_cache_location(Path("/srv/cache"))
        return
    with pytest.raises(MountError, match=f"on {refused} \\({fstype}, mounted on /srv\\)"):
        preflight.check_cache_location(Path("/srv/cache"))


# -- a failure after the lease ------------------------------------------------------------------

@contextlib.contextmanager
def gated_head(ws: Workspace) -> Iterator[None]:
    """Hold every mount of `ws` at its first read of the store's checkpoint HEAD (a FIFO in
    its place) until the block ends; `wait_for` the lease meanwhile, then change the world.
    A mount reads HEAD after taking the lease, or while taking it (its prefetch)."""
    head = Path(ws.store_url.removeprefix("file://")) / "meta" / "HEAD"
    content = head.read_bytes()
    saved = head.with_name("HEAD.saved")
    head.rename(saved)
    os.mkfifo(head)
    try:
        yield
    finally:
        # O_RDWR never blocks; the waiting reader reads `content`, then EOF once it is closed
        with open(os.open(head, os.O_RDWR), "wb") as fifo:
            saved.rename(head)  # every later read gets the file itself
            fifo.write(content)


def start_mount(ws: Workspace, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*WSFS, *mount_args(ws, "--cache-dir", str(cache))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WSFS_RUN_DIR": "/tmp/wsfs-test-run", **ws.env})


@pytest.mark.parametrize("cache_kind", ["fresh", "clean"])
def test_kernel_refusing_the_mount_gives_the_lease_back(ws: Workspace, cache_kind: str) -> None:
    """The mountpoint vanishes between the checks and the mount, so the kernel (libfuse)
    refuses it after the lease is taken: the lease goes back, a fresh cache dir goes, a
    clean one stays clean, and no ERROR about publishing is logged."""
    if cache_kind == "clean":
        ws.mount()
        ws.unmount()
    cache = ws.cache_dir if cache_kind == "clean" else ws.root / "fresh-cache"
    with gated_head(ws):
        proc = start_mount(ws, cache)
        try:
            wait_for("the lease", lambda: lease_of(ws) is not None, timeout=TIMEOUT)
            ws.mnt.rmdir()
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=TIMEOUT)
    ws.mnt.mkdir()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    check_refused(r, MountError.exit_code, "refused to mount", "No such file", mnt=ws.mnt)
    assert "publish" not in err
    if cache_kind == "fresh":
        assert_nothing_left(ws, cache)
    else:
        assert lease_of(ws) is None
        assert stopped_cleanly(cache)
        ws.check_log()
    ws.mount(cache_dir=cache)  # at once: no lease to wait out, no recovery
    assert "unclean stop" not in CacheDir(cache).log.read_text()
    ws.unmount()
    ws.wsfs("gc", ws.store_url)


@pytest.mark.cli
@pytest.mark.parametrize(("why", "profile", "container", "fix"), [
    ("fusermount3: mount failed: Operation not permitted", "", True,
     "--device /dev/fuse --cap-add SYS_ADMIN"),
    ("fuse: mount failed: Permission denied", "docker-default (enforce)", True,
     "--security-opt apparmor=unconfined"),
    ("fuse: mount failed: Permission denied", "docker-default (complain)", False, ""),
    ("fusermount3: bad mount point /x: Permission denied", "docker-default (enforce)", True,
     ""),
    ("fuse: mount failed: Operation not permitted", "", False, ""),
])
def test_the_fix_named_for_a_refused_mount(monkeypatch: pytest.MonkeyPatch, why: str,
                                          profile: str, container: bool, fix: str) -> None:
    """What libfuse said, turned into the fix: only for mount(2) refused, not a bad
    mountpoint; AppArmor only when it enforces."""
    monkeypatch.setattr(preflight, "apparmor_profile", lambda: profile)
    monkeypatch.setattr(preflight, "in_container", lambda: container)
    said = preflight.refusal_fix(why)
    assert (fix in said) if fix else said == "", said


# -- private by default -------------------------------------------------------------------------

def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")]}


def test_cache_dir_and_its_files_are_private(ws: Workspace) -> None:
    mnt = ws.mount()
    with open(mnt / "secret", "wb") as f:  # a dirty block, the journal, the WAL
        f.write(b"x" * 100_000)
        f.flush()
        os.fsync(f.fileno())
    found = modes(ws.cache_dir)
    assert {"wsfs.log", "status.json", "meta.db", "journal"} <= set(found), found
    assert any(name.startswith("dirty/") for name in found), found
    open_to_others = {name: f"{mode:04o}" for name, mode in found.items() if mode & 0o077}
    assert not open_to_others, f"readable by others: {open_to_others}"
    assert found["."] == 0o700
    # the registry of mounts says no more than /proc/self/mounts: any user's `wsfs status`
    (registry,) = Path(ws.env["WSFS_RUN_DIR"]).glob("*.json")
    assert stat.S_IMODE(registry.stat().st_mode) == 0o644
    ws.unmount()
    ws.mount()  # clean blocks downloaded, a checkpoint fetched: private too
    assert (mnt / "secret").read_bytes() == b"x" * 100_000
    assert not {n: m for n, m in modes(ws.cache_dir).items() if m & 0o077}
    ws.unmount()


def test_an_open_cache_dir_is_made_private(ws: Workspace) -> None:
    """A cache dir an older wsfs (or a user) left open: the mount closes it, and says so."""
    ws.mount()
    ws.unmount()
    ws.cache_dir.chmod(0o755)
    ws.cache.log.chmod(0o644)
    r = ws.wsfs("mount", *mount_args(ws)[1:])
    assert "made it 0700" in r.stderr
    assert stat.S_IMODE(ws.cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(ws.cache.log.stat().st_mode) == 0o600
    ws.unmount()


@pytest.mark.cli
def test_default_cache_dir_of_a_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = "s3://bucket/ws"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    root_dir = default_cache_dir(url)
    assert root_dir.parent == Path("/var/cache/wsfs")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(url) == tmp_path / "xdg" / "wsfs" / root_dir.name
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir(url) == tmp_path / "home" / ".cache" / "wsfs" / root_dir.name
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir(url) == tmp_path / "home" / ".cache" / "wsfs" / root_dir.name


def test_a_user_mounts_with_the_default_cache_dir(ws: Workspace, tmp_path: Path) -> None:
    """A mount by a user other than root, through fusermount3, with no --cache-dir: the cache
    goes under ~/.cache/wsfs (root's /var/cache/wsfs is not theirs to write), private.
    /dev/fuse is made usable by all inside a private mount namespace (Debian's udev makes it
    0666; this machine may not), and the user keeps CAP_DAC_READ_SEARCH only to reach a
    Python interpreter that may live under root's home."""
    # fusermount3 checks the mountpoint as the user, who cannot reach into pytest's tmp dir
    top = Path(tempfile.mkdtemp(prefix="wsfs-user-"))
    try:
        user_mount(ws, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def user_mount(ws: Workspace, top: Path) -> None:
    home, store, mnt = top / "home", top / "store", top / "mnt"
    for d in (top, home, store, mnt):
        d.mkdir(exist_ok=True)
        os.chown(d, 65534, 65534)
    url = f"file://{store}"
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
            "env", f"HOME={home}", "XDG_RUNTIME_DIR=", "XDG_CACHE_HOME=", "WSFS_RUN_DIR="]
    fuse = top / "fuse"
    script = f"""
        mknod -m 666 {fuse} c 10 229; mount --bind {fuse} /dev/fuse
        {' '.join(user)} {' '.join(WSFS)} init {url}
        {' '.join(user)} {' '.join(WSFS)} mount {url} {mnt}
        {' '.join(user)} sh -c 'echo hello > {mnt}/f'
        {' '.join(user)} {' '.join(WSFS)} unmount {mnt}
        {' '.join(user)} {' '.join(WSFS)} mount {url} {mnt}
        {' '.join(user)} cat {mnt}/f
        {' '.join(user)} {' '.join(WSFS)} unmount {mnt}
        true"""
    caches = home / ".cache" / "wsfs"
    try:
        r = in_namespace(script, ws, "true")
    finally:  # a daemon left mounted in the namespace keeps it: end it
        for status in caches.glob("*/status.json"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(json.loads(status.read_text())["pid"]), 9)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout
    cache = next(c for c in caches.iterdir() if c.name != "run")
    assert cache.stat().st_uid == 65534
    assert not {n: f"{m:04o}" for n, m in modes(cache).items() if m & 0o077}
    assert CacheDir(cache).log.exists()
    run_wsfs("gc", url)
