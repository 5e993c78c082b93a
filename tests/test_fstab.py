"""fstab and mount(8): util-linux `mount --fstab FILE`, `mount -t fuse.wsfs` and `umount` through
the helpers that packaging/install-mount-helper.sh installs (/sbin/mount.fuse.wsfs, ...).

The install is part of each run (the documented install, done by the tests themselves).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Workspace, not_refused_as_read_only, wait_for, wait_pid_gone
from faultproxy import FaultProxy
from s3servers import S3Server
from test_container import keyless_env, ps_lines_with, secret_rclone, write_credentials

from wsfs import errors
from wsfs.commands import mount8
from wsfs.runtime import Mount, force_unmount, is_mountpoint, mounts, pid_alive

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "packaging" / "install-mount-helper.sh"
SBIN = Path("/sbin")

__all__ = ["secret_rclone"]  # the fixture, shared with test_container


@pytest.fixture(scope="module")
def helpers() -> Iterator[None]:
    """Install the mount helpers the documented way; skip if /sbin cannot be written. The links
    an install had made (packaging/install.sh: into /opt/wsfs) are put back afterwards."""
    if not os.access(SBIN, os.W_OK):
        pytest.skip("installing /sbin/mount.fuse.wsfs needs root")
    names = ("mount.fuse.wsfs", "mount.wsfs", "umount.fuse.wsfs")
    before = {name: os.readlink(SBIN / name) for name in names if (SBIN / name).is_symlink()}
    result = subprocess.run(["sh", str(INSTALL)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert result.returncode == 0, result.stderr
    script = Path(sys.executable).parent / "mount.wsfs"
    try:
        for name in names:
            assert (SBIN / name).resolve() == script.resolve(), name
        yield
    finally:
        for name in names:
            (SBIN / name).unlink(missing_ok=True)
            if name in before:
                (SBIN / name).symlink_to(before[name])


def run(argv: list[str], env: dict[str, str], timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def mount_env(ws: Workspace, base: dict[str, str] | None = None) -> dict[str, str]:
    return {**(base if base is not None else os.environ), **ws.env}


def write_tree(mnt: Path) -> dict[str, bytes]:
    files = {"notebook.ipynb": b'{"cells": []}\n' * 100, "data/blob.bin": os.urandom(1_500_000),
             "deep/a/b/c.txt": b"c\n"}
    for rel, content in files.items():
        (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
        (mnt / rel).write_bytes(content)
    return files


def test_umount_of_what_is_not_mounted_exits_6(helpers: None, tmp_path: Path) -> None:
    """docs/exit-codes.md: 6 when the mount is busy or not mounted, as `wsfs unmount`; the
    helper passed on fusermount3's own 1 for a path it had no record of."""
    for extra in ([], ["-l"]):
        result = run([str(SBIN / "umount.fuse.wsfs"), str(tmp_path), *extra], dict(os.environ))
        assert result.returncode == 6, (extra, result.stderr)


def check_tree(ws: Workspace, files: dict[str, bytes]) -> None:
    """Mount on an empty cache with the CLI and compare every byte."""
    mnt = ws.mount(cache_dir=ws.fresh_cache())
    for rel, content in files.items():
        assert (mnt / rel).read_bytes() == content, rel
    ws.unmount()


def test_fstab_line_mounts_and_umount_waits_for_the_upload(
        helpers: None, ws: Workspace) -> None:
    fstab = ws.root / "fstab"
    fstab.write_text(
        "# a comment line\n"
        f"{ws.store_url} {ws.mnt} fuse.wsfs cache_dir={ws.cache_dir},flush_delay=60,"
        "allow_other,_netdev,noauto,nofail,x-systemd.automount,x-systemd.requires=network"
        "-online.target 0 0\n")
    result = run(["mount", "--fstab", str(fstab), str(ws.mnt)], mount_env(ws))
    assert result.returncode == 0, result.stderr
    assert is_mountpoint(ws.mnt)
    where = mount_of(ws.mnt)
    assert where.fstype == "fuse.wsfs" and "allow_other" in where.super_options
    files = write_tree(ws.mnt)
    pid = ws.daemon_pid()
    assert pid is not None
    result = run(["umount", str(ws.mnt)], mount_env(ws))
    assert result.returncode == 0, result.stderr
    # umount.fuse.wsfs waited like `wsfs unmount`: the daemon has uploaded and exited.
    assert not pid_alive(pid)
    assert ws.status()["state"] == "done"
    ws.check_log()
    check_tree(ws, files)


def test_fstab_on_s3_with_endpoint_and_credentials_file(
        helpers: None, secret_rclone: S3Server, tmp_path: Path) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    secret_rclone.create_bucket(bucket)
    ws = Workspace(tmp_path, f"s3://{bucket}/ws", env=secret_rclone.env())
    try:
        ws.init("--framework", "pytorch")
        creds = tmp_path / "ws.credentials"
        write_credentials(creds, secret_rclone, 0o600)
        fstab = tmp_path / "fstab"
        fstab.write_text(
            f"{ws.store_url}\t{ws.mnt}\tfuse.wsfs\t_netdev,nofail,cache_dir={ws.cache_dir},"
            f"cache_size=64M,flush_delay=1,fsync=remote,"
            f"endpoint_url={secret_rclone.endpoint_url},credentials_file={creds}\t0\t0\n")
        env = keyless_env(secret_rclone)
        env.pop("AWS_ENDPOINT_URL")  # endpoint_url= in fstab is what must point at the server
        result = run(["mount", "--fstab", str(fstab), str(ws.mnt)], mount_env(ws, env))
        assert result.returncode == 0, result.stderr
        files = write_tree(ws.mnt)
        assert ps_lines_with(secret_rclone.secret_key, secret_rclone) == []
        pid = ws.daemon_pid()
        assert pid is not None
        # `umount -i` skips the helper, like any plain unmount: it returns before the
        # daemon's last upload, so wait for the daemon before looking at the store.
        result = run(["umount", "-i", str(ws.mnt)], mount_env(ws, env))
        assert result.returncode == 0, result.stderr
        assert not is_mountpoint(ws.mnt)
        wait_pid_gone(pid, timeout=60)
        assert ws.status()["state"] == "done"
        log = ws.cache.log.read_text()
        assert secret_rclone.secret_key not in log
        ws.check_log()
        check_tree(ws, files)  # the CLI mount takes the keys from the environment
    finally:
        ws.teardown()


def test_mount_t_fuse_wsfs_read_only(helpers: None, ws: Workspace) -> None:
    mnt = ws.mount()
    (mnt / "kept.txt").write_text("kept\n")
    ws.unmount()
    result = run(["mount", "-t", "fuse.wsfs", "-o", f"ro,cache_dir={ws.fresh_cache()}",
                  ws.store_url, str(ws.mnt)], mount_env(ws))
    assert result.returncode == 0, result.stderr
    try:
        assert (ws.mnt / "kept.txt").read_text() == "kept\n"
        with pytest.raises(OSError) as exc:
            (ws.mnt / "new.txt").write_text("no\n")
        assert exc.value.errno == errno.EROFS
    finally:
        result = run(["umount", str(ws.mnt)], mount_env(ws))
    assert result.returncode == 0, result.stderr
    assert not is_mountpoint(ws.mnt)


def test_the_last_of_ro_and_rw_wins(ws: Workspace) -> None:
    """As for mount(8): an fstab line's `ro` overridden by a later `rw` (say, from
    `mount -o rw`) mounts writable; the reverse read-only."""
    mnt = ws.mount("-o", "ro,default_permissions,rw")
    (mnt / "written").write_text("writable")
    ws.unmount()
    mnt = ws.mount("-o", "rw,ro", cache_dir=ws.fresh_cache())  # (a read-only one's own)
    assert (mnt / "written").read_text() == "writable"
    with pytest.raises(OSError) as exc:
        (mnt / "refused").write_text("no")
    assert exc.value.errno == errno.EROFS
    ws.unmount()


def mount_of(mnt: Path) -> Mount:
    """The mount on `mnt`, as mountinfo has it."""
    found = [m for m in mounts() if m.mountpoint == mnt]
    assert found, f"{mnt} is not mounted"
    return found[-1]


def test_each_class_of_generic_option_through_fstab(helpers: None, ws: Workspace) -> None:
    """An fstab line with one option of each class mounts, the kernel's ones in force: libfuse
    3.14 refused `relatime` and `lazytime` (exit 6, after the lease had been taken)."""
    fstab = ws.root / "fstab"
    fstab.write_text(
        f"{ws.store_url} {ws.mnt} fuse.wsfs cache_dir={ws.cache_dir},flush_delay=600,"
        "fsync=remote,sync,noexec,noatime,"  # to the kernel
        "defaults,relatime,lazytime,nodiratime,"  # how wsfs behaves anyway
        "_netdev,nofail,noauto,x-systemd.automount,comment=x,x-wsfs.note=1"  # mount(8)'s
        " 0 0\n")
    result = run(["mount", "--fstab", str(fstab), str(ws.mnt)], mount_env(ws))
    assert result.returncode == 0, result.stderr
    per_mount = mount_of(ws.mnt).options
    assert {"noexec", "noatime", "nosuid", "nodev"} <= per_mount, per_mount
    before = ws.status()["checkpoint"]
    (ws.mnt / "kept.txt").write_text("kept\n")
    # sync: the write was fsync'ed, and with fsync=remote that publishes, flush_delay or not
    wait_for("the synchronous write's checkpoint", lambda: ws.status()["checkpoint"] > before,
             timeout=20)
    result = run(["umount", str(ws.mnt)], mount_env(ws))
    assert result.returncode == 0, result.stderr
    ws.check_log()


def device_works(mnt: Path) -> bool:
    """Whether a device file in the workspace opens as the device (/dev/null's numbers)."""
    node = mnt / "null"
    if not node.exists():
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    try:
        node.write_bytes(b"into the device, not the workspace")
    except PermissionError:  # nodev: EACCES
        return False
    return node.stat().st_size == 0


@pytest.mark.cli
def test_what_mount8_was_asked_is_read_from_its_command_line() -> None:
    """The forms util-linux's getopt takes, and systemd's `mount SRC DST -t T -o O`."""
    parse = mount8.parse_mount_command
    assert parse(["--fstab", "/f", "-o", "dev", "/mnt"]) == (["dev"], Path("/f"), ["/mnt"])
    assert parse(["-vTf2", "-odev,suid", "--options=ro", "/mnt"]) == (
        ["dev", "suid", "ro"], Path("f2"), ["/mnt"])
    assert parse(["-no", "suid", "-t", "fuse.wsfs", "s3://b/ws", "/mnt"]) == (
        ["suid"], None, ["s3://b/ws", "/mnt"])
    assert parse(["s3://b/ws", "/mnt", "-t", "fuse.wsfs", "-o", "nodev,dev"])[0] == [
        "nodev", "dev"]
    assert parse(["--source", "s", "--target", "/t", "--", "-x"])[2] == ["s", "/t", "-x"]
    assert mount8.last_of(["dev", "nodev", "suid"], "dev", "nodev") == "nodev"
    assert mount8.last_of(["rw"], "dev", "nodev") is None


@pytest.mark.cli
def test_a_remount_keeps_the_flags_it_does_not_name() -> None:
    from wsfs.commands import remount as r
    mounted = ({"rw", "nosuid", "nodev", "relatime"}, {"rw", "user_id=0"})
    # an fstab line's options (mount(8) passes those on a remount) name neither nosuid nor nodev
    assert r.remount_flags(["ro", "remount", "cache_dir=/c", "flush_delay=2"], [],
                           mounted) == r.MS_REMOUNT | r.MS_RDONLY | r.MS_NOSUID | r.MS_NODEV
    # dev asked for, hidden by libmount 2.38: honoured
    assert r.remount_flags(["ro", "remount"], ["dev", "remount"], mounted) == (
        r.MS_REMOUNT | r.MS_RDONLY | r.MS_NOSUID)
    assert r.remount_flags(["remount", "noexec", "user_id=0", "default_permissions"], [],
                           ({"ro"}, {"ro"})) == r.MS_REMOUNT | r.MS_RDONLY | r.MS_NOEXEC
    with pytest.raises(errors.UsageError, match="'strictatime' is refused"):
        r.remount_flags(["remount", "strictatime"], [], mounted)
    with pytest.raises(errors.UsageError, match="unknown mount option 'bogus'"):
        r.remount_flags(["remount", "bogus"], [], mounted)


def test_dev_and_suid_when_asked_through_mount8(helpers: None, ws: Workspace) -> None:
    """libmount 2.38 (Debian 12) drops `dev` and `suid` before it runs the helper, so an fstab
    line asking for them mounted nodev,nosuid. Asked (in fstab or with -o), they are honoured;
    not asked, nodev,nosuid stays; the last of two opposites wins, as for mount(8)."""
    fstab = ws.root / "fstab"
    fstab.write_text(f"{ws.store_url} {ws.mnt} fuse.wsfs cache_dir={ws.cache_dir},dev,suid "
                     "0 0\n")
    for extra, dev, suid in (([], True, True), (["-o", "nodev"], False, True)):
        result = run(["mount", "--fstab", str(fstab), *extra, str(ws.mnt)], mount_env(ws))
        assert result.returncode == 0, result.stderr
        per_mount = mount_of(ws.mnt).options
        assert ("nodev" not in per_mount, "nosuid" not in per_mount) == (dev, suid), per_mount
        assert device_works(ws.mnt) == dev
        result = run(["umount", str(ws.mnt)], mount_env(ws))
        assert result.returncode == 0, result.stderr
    for opts, dev, suid in (("suid", False, True), ("noexec", False, False)):
        result = run(["mount", "-t", "fuse.wsfs", "-o", f"cache_dir={ws.cache_dir},{opts}",
                      ws.store_url, str(ws.mnt)], mount_env(ws))
        assert result.returncode == 0, result.stderr
        per_mount = mount_of(ws.mnt).options
        assert ("nodev" not in per_mount, "nosuid" not in per_mount) == (dev, suid), per_mount
        assert device_works(ws.mnt) == dev
        result = run(["umount", str(ws.mnt)], mount_env(ws))
        assert result.returncode == 0, result.stderr
    ws.check_log()


@pytest.mark.parametrize("option", ["strictatime", "dirsync", "mand", "iversion"])
def test_a_refused_option_fails_before_anything_is_taken(
        helpers: None, ws: Workspace, tmp_path: Path, option: str) -> None:
    """One sentence with the reason; no cache dir made, no lease in the store."""
    cache = tmp_path / "never-made"
    result = run(["mount", "-t", "fuse.wsfs", "-o", f"cache_dir={cache},{option}",
                  ws.store_url, str(ws.mnt)], mount_env(ws))
    assert result.returncode == errors.UsageError.exit_code, result.stderr
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert said and f"the mount option '{option}' is refused: " in said[0], said
    assert not is_mountpoint(ws.mnt)
    assert not cache.exists()
    assert not (tmp_path / "store" / "lease").exists()


def refused_writes(mnt: Path) -> list[str]:
    """The writes that did not fail with EROFS on `mnt` (each kind the VFS checks)."""
    attempts: dict[str, Callable[[], object]] = {
        "create": lambda: (mnt / "new.txt").write_text("no"),
        "append": lambda: (mnt / "kept.txt").open("a").close(),
        "mkdir": lambda: (mnt / "newdir").mkdir(),
        "unlink": lambda: (mnt / "kept.txt").unlink(),
        "chmod": lambda: (mnt / "kept.txt").chmod(0o600),
    }
    return not_refused_as_read_only(attempts)


def test_remount_ro_and_rw_through_mount8(helpers: None, ws: Workspace) -> None:
    """`mount -o remount,ro` was refused by the helper ("unknown mount option 'remount'").
    Now the kernel switches the mount: writes get EROFS, what was dirty is still uploaded,
    a file open for writing makes it refuse (one sentence), and nosuid,nodev stay although
    the fstab line (which mount(8) passes on a remount) does not name them."""
    fstab = ws.root / "fstab"
    fstab.write_text(f"{ws.store_url} {ws.mnt} fuse.wsfs cache_dir={ws.cache_dir},"
                     "flush_delay=2 0 0\n")
    env = mount_env(ws)
    assert run(["mount", "--fstab", str(fstab), str(ws.mnt)], env).returncode == 0
    (ws.mnt / "kept.txt").write_text("kept\n")
    with (ws.mnt / "open.txt").open("w"):
        result = run(["mount", "--fstab", str(fstab), "-o", "remount,ro", str(ws.mnt)], env)
        assert result.returncode == errors.MountError.exit_code, result.stderr
        assert "a file is open for writing there" in result.stderr
    assert "rw" in mount_of(ws.mnt).super_options
    checkpoint = ws.status()["checkpoint"]
    (ws.mnt / "dirty.bin").write_bytes(b"d" * 300_000)  # uploaded 2 s from now
    result = run(["mount", "--fstab", str(fstab), "-o", "remount,ro", str(ws.mnt)], env)
    assert result.returncode == 0, result.stderr
    per_mount, superblock = mount_of(ws.mnt).options, mount_of(ws.mnt).super_options
    assert "ro" in superblock and {"ro", "nosuid", "nodev"} <= per_mount, per_mount
    assert refused_writes(ws.mnt) == []
    wait_for("the upload of what was dirty at the remount",
             lambda: ws.status()["dirty_bytes"] == 0
             and ws.status()["checkpoint"] > checkpoint, timeout=30)
    result = run(["mount", "-o", "remount,rw", str(ws.mnt)], env)  # from mountinfo
    assert result.returncode == 0, result.stderr
    per_mount, superblock = mount_of(ws.mnt).options, mount_of(ws.mnt).super_options
    assert "rw" in superblock and {"rw", "nosuid", "nodev"} <= per_mount, per_mount
    (ws.mnt / "after.txt").write_text("after\n")
    assert run(["umount", str(ws.mnt)], env).returncode == 0
    ws.check_log()
    check_tree(ws, {"kept.txt": b"kept\n", "dirty.bin": b"d" * 300_000,
                    "after.txt": b"after\n"})


def test_a_read_only_mount_is_not_switched_to_read_write(
        helpers: None, ws: Workspace) -> None:
    """A mount started `ro` is a view of the workspace's checkpoints without the lease
    (daemon/view.py): `remount,rw` is refused with one sentence, and the mount stays
    read-only (the daemon refuses writes whatever the kernel's flags say)."""
    (ws.mount() / "kept.txt").write_text("kept\n")
    ws.unmount()
    env = mount_env(ws)
    result = run(["mount", "-t", "fuse.wsfs", "-o", f"ro,cache_dir={ws.fresh_cache()}",
                  ws.store_url, str(ws.mnt)], env)
    assert result.returncode == 0, result.stderr
    result = run(["mount", "-o", "remount,rw", str(ws.mnt)], env)
    assert result.returncode == errors.MountError.exit_code, result.stderr
    assert "cannot be switched to read-write" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "ro" in mount_of(ws.mnt).super_options
    assert refused_writes(ws.mnt) == []
    assert run(["umount", str(ws.mnt)], env).returncode == 0
    ws.check_log()


def test_a_mount_waits_for_the_previous_daemon_of_its_cache_dir(
        helpers: None, proxied: tuple[Workspace, FaultProxy]) -> None:
    """After a plain umount the daemon goes on uploading, holding the cache dir; a mount of
    the same cache dir failed at once ("another wsfs daemon is using the cache dir"). Now it
    waits, saying so with the figures, up to handover_timeout; then all data is there."""
    ws, proxy = proxied
    env = mount_env(ws)
    mnt = ws.mount(flush_delay=600)  # nothing uploads before the unmount
    files = {f"f{i}.bin": os.urandom(1 << 20) for i in range(6)}
    for name, content in files.items():
        (mnt / name).write_bytes(content)
    pid = ws.daemon_pid()
    assert pid is not None
    proxy.throttle(1 << 20)  # 1 MiB/s: the final upload takes about 6 s
    result = run(["umount", "-i", str(mnt)], env)  # no helper: returns before the upload
    assert result.returncode == 0, result.stderr
    wait_for("the final upload", lambda: ws.status()["state"] == "flushing", timeout=30)
    mount = ["mount", "-t", "fuse.wsfs", "-o", f"cache_dir={ws.cache_dir}", ws.store_url,
             str(mnt)]
    mount[4] += ",handover_timeout=0.5"
    result = run(mount, env)
    assert result.returncode == errors.MountError.exit_code, result.stderr
    assert f"(pid {pid}) is still uploading after 0.5s" in result.stderr
    assert pid_alive(pid) and not is_mountpoint(mnt)
    mount[4] = mount[4].removesuffix(",handover_timeout=0.5")
    started = time.monotonic()
    result = run(mount, env)
    waited = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"(pid {pid}) is still uploading what its mount left (" in result.stderr
    assert " MiB left (" in result.stderr  # the figures of what is left
    assert not pid_alive(pid), "mounted before the previous daemon was done"
    print(f"waited {waited:.1f} s for the previous daemon")
    proxy.throttle(None)
    for name, content in files.items():
        assert (mnt / name).read_bytes() == content, name
    ws.unmount()
    check_tree(ws, files)


def test_a_daemon_that_serves_its_cache_dir_is_not_waited_for(
        ws: Workspace, tmp_path: Path) -> None:
    """Only a daemon past its unmount lets go of the cache dir by itself: while one serves,
    a second mount of the same cache dir is refused at once, as before."""
    ws.mount()
    other = tmp_path / "other"
    other.mkdir()
    started = time.monotonic()
    result = ws.wsfs("mount", ws.store_url, str(other), "--cache-dir", str(ws.cache_dir),
                     check=False)
    assert result.returncode == errors.LeaseError.exit_code, result.stderr
    assert "is using the cache dir" in result.stderr and "waiting" not in result.stderr
    assert time.monotonic() - started < 30 and not is_mountpoint(other)
    ws.unmount()


def test_helper_errors_reach_mount(helpers: None, ws: Workspace, tmp_path: Path) -> None:
    result = run(["mount", "-t", "fuse.wsfs", "-o", f"cache_dir={ws.cache_dir},bogus=1",
                  ws.store_url, str(ws.mnt)], mount_env(ws))
    assert result.returncode != 0
    assert "unknown mount option 'bogus=1'" in result.stderr
    empty = tmp_path / "empty-store"
    empty.mkdir()
    result = run(["mount", "-t", "fuse.wsfs", "-o", f"cache_dir={tmp_path / 'c2'}",
                  f"file://{empty}", str(ws.mnt)], mount_env(ws))
    assert result.returncode != 0
    assert "no wsfs workspace" in result.stderr
    assert not is_mountpoint(ws.mnt)


def test_helper_called_directly_returns_the_wsfs_exit_code(ws: Workspace,
                                                            tmp_path: Path) -> None:
    """`mount.wsfs SOURCE DIR -o OPTS` as mount(8) calls it, no install needed."""
    helper = Path(sys.executable).parent / "mount.wsfs"
    empty = tmp_path / "empty-store"
    empty.mkdir()
    result = run([str(helper), f"file://{empty}", str(ws.mnt), "-o",
                  f"cache_dir={tmp_path / 'c'},_netdev"], mount_env(ws))
    assert result.returncode == errors.NoWorkspaceError.exit_code, result.stderr
    creds = tmp_path / "open.credentials"
    creds.write_text("[default]\n")
    creds.chmod(0o644)
    result = run([str(helper), ws.store_url, str(ws.mnt), "-o",
                  f"credentials_file={creds}"], mount_env(ws))
    assert result.returncode == errors.UsageError.exit_code
    assert "chmod 600" in result.stderr
    # -f (fake) does nothing, successfully
    result = run([str(helper), ws.store_url, str(ws.mnt), "-f", "-o", "rw"], mount_env(ws))
    assert result.returncode == 0 and not is_mountpoint(ws.mnt)


@pytest.fixture(autouse=True)
def _no_leftover_mount(tmp_path: Path) -> Iterator[None]:
    yield
    mnt = tmp_path / "mnt"
    force_unmount(mnt)
