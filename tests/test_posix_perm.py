"""Ownership, modes, timestamps and permission checks through a real mount, and the marker.

The kernel checks permissions (`default_permissions`); wsfs must store what it is told
(chmod/chown/utimensat to the nanosecond: Python's .pyc check and tar depend on it), own new
files by the caller, apply setgid directories, and protect `/.workspace.initialized` from
everyone, root included. Unprivileged checks run in a child process that drops to uid 1000
(the shared mount has `allow_other`).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

from conftest import Workspace
from posix_util import (  # noqa: F401
    RENAME_EXCHANGE,
    d_fixture,
    errno_of,
    renameat2,
    run_py,
    shared_fixture,
)

USER = 1000
MARKER = ".workspace.initialized"


def as_user(d: Path, code: str, umask: int = 0o022) -> str:
    """Run `code` as uid/gid 1000 in directory `d`; return what it printed."""
    return run_py(code, uid=USER, gid=USER, cwd=d, umask=umask).stdout.strip()


def try_as_user(d: Path, op: str) -> str:
    """The errno name an operation fails with as uid 1000 ("ok" if it succeeds)."""
    code = f"try:\n    {op}\n    print('ok')\nexcept OSError as e:\n" \
           "    print(errno.errorcode[e.errno])"
    return as_user(d, code)


def test_unprivileged_user_is_refused_and_allowed(d: Path) -> None:
    os.chmod(d, 0o755)  # root's directory
    assert try_as_user(d, "open('x', 'w')") == "EACCES"
    assert try_as_user(d, "os.mkdir('x')") == "EACCES"
    (d / "root-file").write_text("secret")
    os.chmod(d / "root-file", 0o600)
    assert try_as_user(d, "open('root-file').read()") == "EACCES"
    os.chmod(d / "root-file", 0o644)
    assert try_as_user(d, "open('root-file').read()") == "ok"
    assert try_as_user(d, "open('root-file', 'a')") == "EACCES"
    assert try_as_user(d, "os.chmod('root-file', 0o777)") == "EPERM"
    assert try_as_user(d, "os.chown('root-file', 1000, 1000)") == "EPERM"
    assert try_as_user(d, "os.utime('root-file', ns=(1, 1))") == "EPERM"
    assert try_as_user(d, "os.unlink('root-file')") == "EACCES"
    (d / "closed").mkdir(mode=0o700)
    assert try_as_user(d, "os.stat('closed/anything')") == "EACCES"
    (d / "open").mkdir()
    os.chmod(d / "open", 0o777)
    assert try_as_user(d, "open('open/mine', 'w').write('hi')") == "ok"
    assert try_as_user(d, "os.mkdir('open/mydir')") == "ok"
    st = (d / "open" / "mine").stat()
    assert (st.st_uid, st.st_gid) == (USER, USER)
    assert stat.S_IMODE(st.st_mode) == 0o644  # 0666 & ~umask 022
    st = (d / "open" / "mydir").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o755)
    assert try_as_user(d, "os.chmod('open/mine', 0o600)") == "ok"
    assert stat.S_IMODE((d / "open" / "mine").stat().st_mode) == 0o600
    # sticky directory: only the owner may remove a name
    (d / "tmp").mkdir()
    os.chmod(d / "tmp", 0o1777)
    (d / "tmp" / "roots").write_text("r")
    assert try_as_user(d, "os.unlink('tmp/roots')") == "EPERM"
    assert try_as_user(d, "open('tmp/users', 'w'); os.unlink('tmp/users')") == "ok"


def test_umask_is_applied(d: Path) -> None:
    os.chmod(d, 0o777)
    as_user(d, "open('f077', 'w'); os.mkdir('d077')", umask=0o077)
    as_user(d, "open('f002', 'w'); os.mkdir('d002')", umask=0o002)
    as_user(d, "os.close(os.open('f0', os.O_CREAT | os.O_WRONLY, 0o777))", umask=0)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
    assert modes == {"f077": 0o600, "d077": 0o700, "f002": 0o664, "d002": 0o775, "f0": 0o777}


def test_setgid_directory_inheritance(d: Path) -> None:
    sg = d / "sg"
    sg.mkdir()
    os.chown(sg, 0, 1234)
    os.chmod(sg, 0o2777)
    as_user(sg, "open('f', 'w'); os.mkdir('sub'); open('sub/g', 'w')")
    f, sub = (sg / "f").stat(), (sg / "sub").stat()
    assert (f.st_uid, f.st_gid) == (USER, 1234)
    assert not f.st_mode & stat.S_ISGID
    assert (sub.st_uid, sub.st_gid) == (USER, 1234)
    assert sub.st_mode & stat.S_ISGID
    assert (sg / "sub" / "g").stat().st_gid == 1234
    # outside a setgid directory the caller's group wins
    os.chmod(d, 0o777)
    as_user(d, "open('plain', 'w')")
    assert (d / "plain").stat().st_gid == USER


def test_chmod_chown_utimens_persist_after_remount(mounted: Workspace) -> None:
    m = mounted.mnt
    f = m / "f"
    f.write_text("x")
    os.chmod(f, 0o4751)
    os.chown(f, 1000, 2000)  # chown of a file drops setuid (Linux does it even for root)
    assert stat.S_IMODE(f.stat().st_mode) == 0o751
    os.chmod(f, 0o4751)
    os.utime(f, ns=(1_234_567_890_123_456_789, 1_600_000_000_987_654_321))
    (m / "dir").mkdir()
    os.chmod(m / "dir", 0o3750)
    os.chown(m / "dir", 3000, 4000)
    os.utime(m / "dir", ns=(5, 1_000_000_001))
    os.symlink("f", m / "link")
    os.chown(m / "link", 1000, 1000, follow_symlinks=False)
    os.utime(m / "link", ns=(7, 8), follow_symlinks=False)
    ctime = f.stat().st_ctime_ns
    expect = {p: os.lstat(m / p) for p in ("f", "dir", "link")}
    assert stat.S_IMODE(expect["f"].st_mode) == 0o4751
    assert expect["f"].st_mtime_ns == 1_600_000_000_987_654_321
    assert expect["f"].st_atime_ns == 1_234_567_890_123_456_789
    assert (expect["link"].st_mtime_ns, expect["link"].st_uid) == (8, 1000)
    mounted.remount(wipe_cache=True)
    for p, want in expect.items():
        got = os.lstat(m / p)
        assert (got.st_mode, got.st_uid, got.st_gid, got.st_atime_ns, got.st_mtime_ns) == \
               (want.st_mode, want.st_uid, want.st_gid, want.st_atime_ns, want.st_mtime_ns), p
    assert f.stat().st_ctime_ns == ctime
    assert f.read_text() == "x"
    mounted.unmount()


S = 10**9  # nanoseconds in a second
# Times that do not fit in 64 bits of nanoseconds (1677-09-21 to 2262-04-11), with ext4's
# limits (1901-12-13 to 2446-05-10) and those of the kernel's 64-bit seconds among them.
FAR_TIMES = {
    "y1600": -11_676_096_000 * S + 123_456_789,
    "y2300": 10_413_792_000 * S + 987_654_321,
    "ext4_min": -(2**31) * S,
    "ext4_max": (2**34 - 2**31 - 1) * S + 999_999_999,
    "min": -(2**63) * S,  # (the kernel zeroes the nanoseconds in its first and last second)
    "max": (2**63 - 1) * S,
    "near_max": (2**63 - 2) * S + 999_999_999,
    "near_min": (1 - 2**63) * S + 1,
    "before_1970": -1,
}


def test_times_beyond_64_bit_nanoseconds_persist_exactly(mounted: Workspace) -> None:
    """Any time the kernel can hand over is kept to the nanosecond: a 64-bit nanosecond
    count (SQLite's integer) ends in 1677 and 2262, and `touch -d 2300-01-01` failed with
    EIO; the seconds and the nanoseconds are kept apart now."""
    m = mounted.mnt
    for date in ("2300-01-01", "1600-01-01"):
        subprocess.run(["touch", "-d", date, str(m / date)], check=True, timeout=30)
    (m / "dir").mkdir()
    os.symlink("nowhere", m / "link")
    for name, t in FAR_TIMES.items():
        (m / name).write_bytes(b"x")
        os.utime(m / name, ns=(t, t))
    os.utime(m / "dir", ns=(FAR_TIMES["min"], FAR_TIMES["max"]))
    os.utime(m / "link", ns=(FAR_TIMES["max"], FAR_TIMES["y1600"]), follow_symlinks=False)

    def times() -> dict[str, tuple[int, int, int]]:
        return {p.name: (p.lstat().st_atime_ns, p.lstat().st_mtime_ns, p.lstat().st_ctime_ns)
                for p in m.iterdir() if not p.name.startswith(".")}

    expect = times()
    for name, t in FAR_TIMES.items():
        assert expect[name][:2] == (t, t), name
    assert expect["dir"][:2] == (FAR_TIMES["min"], FAR_TIMES["max"])
    assert expect["link"][:2] == (FAR_TIMES["max"], FAR_TIMES["y1600"])
    assert expect["2300-01-01"][1] // S // 86400 // 365 + 1970 == 2300
    assert expect["1600-01-01"][1] // S // 86400 // 365 + 1970 in (1599, 1600)
    mounted.remount(wipe_cache=True)
    assert times() == expect
    mounted.unmount()


def test_marker_is_protected_even_from_root(shared: Workspace) -> None:
    m = shared.mnt
    marker = m / MARKER
    content = marker.read_bytes()
    assert content.startswith(b"{")  # JSON, readable by anyone who may read
    before = marker.stat()
    (m / "other").write_text("o")
    (m / "otherdir").mkdir()
    assert errno_of(os.unlink, marker) == errno.EPERM
    assert errno_of(os.rename, marker, m / "elsewhere") == errno.EPERM
    assert errno_of(os.rename, m / "other", marker) == errno.EPERM
    assert errno_of(renameat2, marker, m / "other", RENAME_EXCHANGE) == errno.EPERM
    assert errno_of(renameat2, m / "otherdir", marker, RENAME_EXCHANGE) == errno.EPERM
    assert errno_of(os.truncate, marker, 0) == errno.EPERM
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC,
                  os.O_WRONLY | os.O_CREAT):
        assert errno_of(os.open, marker, flags) == errno.EPERM, flags
    assert errno_of(os.chmod, marker, 0o777) == errno.EPERM
    assert errno_of(os.chown, marker, 1000, 1000) == errno.EPERM
    assert errno_of(os.utime, marker, None) == errno.EPERM
    assert errno_of(lambda: os.utime(marker, ns=(1, 1))) == errno.EPERM
    # a second name for it does not open a way around the policy
    os.link(marker, m / "alias")
    assert errno_of(os.open, m / "alias", os.O_WRONLY) == errno.EPERM
    assert errno_of(os.truncate, m / "alias", 0) == errno.EPERM
    os.unlink(m / "alias")
    after = marker.stat()
    assert marker.read_bytes() == content
    assert (after.st_ino, after.st_size, after.st_mode, after.st_mtime_ns) == \
           (before.st_ino, before.st_size, before.st_mode, before.st_mtime_ns)
    os.unlink(m / "other")
    os.rmdir(m / "otherdir")


def test_rm_rf_everything_leaves_only_the_marker(mounted: Workspace) -> None:
    m = mounted.mnt
    (m / "dir" / "sub").mkdir(parents=True)
    (m / "dir" / "sub" / "f").write_text("f")
    (m / ".hidden").write_text("h")
    (m / ".hiddendir").mkdir()
    (m / ".hiddendir" / "x").touch()
    (m / "..dots").touch()
    os.symlink("dir", m / "link")
    r = subprocess.run(["sh", "-c", f"cd '{m}' && rm -rf ./* ./.[!.]* ./..?*"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    complaints = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(complaints) == 1 and MARKER in complaints[0], r.stderr
    assert "not permitted" in complaints[0]
    assert os.listdir(m) == [MARKER]
    mounted.remount(wipe_cache=True)
    assert os.listdir(m) == [MARKER]
    mounted.unmount()
