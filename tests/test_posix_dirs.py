"""POSIX semantics of names through a real mount: directories, links, renames, readdir.

git renames lock files over refs, pip and conda move whole trees into place and replace
files atomically, Jupyter saves by rename: each of these must behave exactly as on a local
disk, including the link counts and the errors.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import Workspace, wait_for
from posix_util import (  # noqa: F401
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    d_fixture,
    errno_of,
    meta_rows,
    renameat2,
    run_py,
    shared_fixture,
)

from wsfs.fs.base import LISTING_CACHE_DIR_MAX


def ls_a(path: Path) -> dict[str, int]:
    """`ls -ai`: every name the directory lists, with its inode number."""
    out = subprocess.run(["ls", "-aif1", str(path)], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    entries = {}
    for line in filter(None, out):
        ino, name = line.strip().split(" ", 1)
        assert name not in entries, f"{name} listed twice"
        entries[name] = int(ino)
    return entries


def test_mkdir_rmdir_and_their_errors(d: Path) -> None:
    sub = d / "sub"
    sub.mkdir()
    assert sub.is_dir()
    assert errno_of(os.mkdir, sub) == errno.EEXIST
    (sub / "f").write_text("x")
    assert errno_of(os.rmdir, sub) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, sub / "f") == errno.ENOTDIR
    assert errno_of(os.mkdir, sub / "f" / "x") == errno.ENOTDIR
    assert errno_of(os.open, sub / "f" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.unlink, sub) == errno.EISDIR
    assert errno_of(os.open, sub, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.rmdir, d / "missing") == errno.ENOENT
    os.unlink(sub / "f")
    os.rmdir(sub)
    assert not sub.exists()
    assert errno_of(os.mkdir, d / "gone" / "x") == errno.ENOENT


def test_readdir_lists_dot_and_dotdot(d: Path) -> None:
    sub = d / "sub"
    sub.mkdir()
    (sub / "a").write_text("a")
    entries = ls_a(sub)
    assert set(entries) == {".", "..", "a"}
    assert entries["."] == sub.stat().st_ino
    assert entries[".."] == d.stat().st_ino
    root = ls_a(d.parent)
    assert root["."] == d.parent.stat().st_ino  # the mount's root ("..": ls shows the host's)
    assert ".workspace.initialized" in root


def test_readdir_of_a_big_directory_resumes_without_repeats(d: Path) -> None:
    names = {f"entry-with-a-longish-name-{i:05d}" for i in range(700)}
    for n in names:
        (d / n).touch()
    entries = ls_a(d)  # several readdir requests: cookies must resume exactly
    assert set(entries) == names | {".", ".."}
    assert len({entries[n] for n in names}) == len(names)
    # remove entries in the middle of a listing: nothing repeats, survivors all appear
    with os.scandir(d) as it:
        seen = [next(it).name for _ in range(100)]
        for n in sorted(names)[300:400]:
            os.unlink(d / n)
        seen += [e.name for e in it]
    assert len(seen) == len(set(seen))
    survivors = names - set(sorted(names)[300:400])
    assert survivors <= set(seen)


def test_directory_nlink_counts_subdirectories(d: Path) -> None:
    assert d.stat().st_nlink == 2
    for i in range(3):
        (d / f"s{i}").mkdir()
    (d / "file").touch()
    assert d.stat().st_nlink == 5
    os.rmdir(d / "s0")
    assert d.stat().st_nlink == 4
    (d / "s1" / "deeper").mkdir()
    assert (d / "s1").stat().st_nlink == 3
    assert d.stat().st_nlink == 4


def test_symlinks(d: Path) -> None:
    (d / "target").write_text("pointed at")
    os.symlink("target", d / "rel")
    os.symlink(str(d / "target"), d / "abs")
    os.symlink("does/not/exist", d / "dangling")
    assert os.readlink(d / "rel") == "target"
    assert os.readlink(d / "abs") == str(d / "target")
    assert (d / "rel").read_text() == (d / "abs").read_text() == "pointed at"
    assert os.lstat(d / "rel").st_size == len("target")
    assert os.lstat(d / "dangling").st_size == len("does/not/exist")
    assert (os.lstat(d / "rel").st_mode & 0o170000) == 0o120000
    assert not (d / "dangling").exists() and (d / "dangling").is_symlink()
    assert errno_of(os.readlink, d / "target") == errno.EINVAL
    assert errno_of(os.symlink, "x", d / "rel") == errno.EEXIST
    (d / "sub").mkdir()
    os.symlink("../target", d / "sub" / "up")
    assert (d / "sub" / "up").read_text() == "pointed at"
    os.symlink("sub", d / "dirlink")
    assert (d / "dirlink" / "up").read_text() == "pointed at"


def test_hard_links(d: Path) -> None:
    a, b = d / "a", d / "b"
    a.write_bytes(b"shared data")
    os.link(a, b)
    sa, sb = a.stat(), b.stat()
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    with open(b, "ab") as f:
        f.write(b"+more")
    assert a.read_bytes() == b"shared data+more"
    os.link(b, d / "c")
    assert a.stat().st_nlink == 3
    os.unlink(a)
    assert b.stat().st_nlink == 2
    os.unlink(d / "c")
    assert b.stat().st_nlink == 1
    assert b.read_bytes() == b"shared data+more"
    assert errno_of(os.link, d, d / "dirlink") == errno.EPERM
    assert errno_of(os.link, b, d / "b") == errno.EEXIST


def test_link_counts_seen_from_another_process(d: Path) -> None:
    """The kernel caches attributes for long: every name must show the new count anyway."""
    a, b = d / "a", d / "b"
    a.write_bytes(b"x")
    a.stat()  # cache a's attributes in the kernel
    os.link(a, b)
    code = "print(os.stat({!r}).st_nlink)"
    assert run_py(code.format(str(a))).stdout.strip() == "2"
    os.unlink(b)
    assert run_py(code.format(str(a))).stdout.strip() == "1"
    os.rename(a, d / "moved")
    assert run_py(code.format(str(d / "moved"))).stdout.strip() == "1"


def test_rename_file_replaces_atomically(d: Path) -> None:
    (d / "new").write_text("new contents")
    (d / "old").write_text("old contents")
    ino = (d / "new").stat().st_ino
    os.rename(d / "new", d / "old")
    assert not (d / "new").exists()
    assert (d / "old").read_text() == "new contents"
    assert (d / "old").stat().st_ino == ino
    assert sorted(os.listdir(d)) == ["old"]
    assert errno_of(os.rename, d / "missing", d / "x") == errno.ENOENT
    os.rename(d / "old", d / "old")  # same name: nothing happens
    assert (d / "old").read_text() == "new contents"


def test_rename_replaced_open_file_stays_readable(d: Path) -> None:
    (d / "victim").write_bytes(b"v" * 3000)
    (d / "src").write_bytes(b"s")
    with open(d / "victim", "rb") as f:
        os.rename(d / "src", d / "victim")
        assert f.read() == b"v" * 3000
    assert (d / "victim").read_bytes() == b"s"


def test_rename_directories(d: Path) -> None:
    p1, p2 = d / "p1", d / "p2"
    p1.mkdir()
    p2.mkdir()
    (p1 / "tree" / "deep").mkdir(parents=True)
    (p1 / "tree" / "deep" / "f").write_text("deep file")
    (p2 / "empty").mkdir()
    (p2 / "full").mkdir()
    (p2 / "full" / "x").touch()
    (p2 / "afile").touch()
    assert errno_of(os.rename, p1 / "tree", p2 / "full") == errno.ENOTEMPTY
    assert errno_of(os.rename, p1 / "tree", p2 / "afile") == errno.ENOTDIR
    assert errno_of(os.rename, p2 / "afile", p1 / "tree") == errno.EISDIR
    assert errno_of(os.rename, p1 / "tree", p1 / "tree" / "deep" / "inside") == errno.EINVAL
    assert (p1.stat().st_nlink, p2.stat().st_nlink) == (3, 4)
    os.rename(p1 / "tree", p2 / "empty")  # over an empty directory, across parents
    assert (p1.stat().st_nlink, p2.stat().st_nlink) == (2, 4)
    assert (p2 / "empty" / "deep" / "f").read_text() == "deep file"
    assert ls_a(p2 / "empty")[".."] == p2.stat().st_ino
    assert sorted(os.listdir(p1)) == []
    os.rename(p2 / "empty", p1 / "back")  # into a new name
    assert (p1.stat().st_nlink, p2.stat().st_nlink) == (3, 3)
    assert (p1 / "back" / "deep" / "f").read_text() == "deep file"
    assert ls_a(p1 / "back")[".."] == p1.stat().st_ino


def test_renameat2_noreplace(d: Path) -> None:
    (d / "a").write_text("a")
    (d / "b").write_text("b")
    try:
        renameat2(d / "a", d / "b", RENAME_NOREPLACE)
    except OSError as e:
        assert e.errno == errno.EEXIST
    else:
        raise AssertionError("RENAME_NOREPLACE replaced an existing file")
    assert (d / "b").read_text() == "b"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert (d / "c").read_text() == "a" and not (d / "a").exists()


def test_renameat2_exchange_file_and_directory_across_parents(d: Path) -> None:
    p1, p2 = d / "p1", d / "p2"
    p1.mkdir()
    p2.mkdir()
    (p1 / "f").write_text("file")
    (p2 / "sub").mkdir()
    (p2 / "sub" / "inner").write_text("inner")
    file_ino, dir_ino = (p1 / "f").stat().st_ino, (p2 / "sub").stat().st_ino
    renameat2(p1 / "f", p2 / "sub", RENAME_EXCHANGE)
    assert (p1 / "f").stat().st_ino == dir_ino and (p2 / "sub").stat().st_ino == file_ino
    assert (p1 / "f" / "inner").read_text() == "inner"
    assert (p2 / "sub").read_text() == "file"
    assert (p1.stat().st_nlink, p2.stat().st_nlink) == (3, 2)
    assert ls_a(p1 / "f")[".."] == p1.stat().st_ino
    try:
        renameat2(p1 / "f", p2 / "missing", RENAME_EXCHANGE)
    except OSError as e:
        assert e.errno == errno.ENOENT
    else:
        raise AssertionError("RENAME_EXCHANGE with a missing target succeeded")


def test_names_longer_than_255_bytes(d: Path) -> None:
    ok, long = "n" * 255, "n" * 256
    (d / ok).write_text("fits")
    assert (d / ok).read_text() == "fits"
    assert errno_of(os.open, d / long, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, d / long) == errno.ENAMETOOLONG
    assert errno_of(os.stat, d / long) == errno.ENAMETOOLONG
    assert errno_of(os.rename, d / ok, d / long) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, "x", d / long) == errno.ENAMETOOLONG
    assert errno_of(os.link, d / ok, d / long) == errno.ENAMETOOLONG


def test_names_persist_after_remount(mounted: Workspace) -> None:
    m = mounted.mnt
    (m / "dir" / "sub").mkdir(parents=True)
    (m / "dir" / "file").write_text("file")
    os.link(m / "dir" / "file", m / "hard")
    os.symlink("dir/file", m / "rel")
    os.symlink("/nonexistent/abs", m / "dangling")
    (m / "from").mkdir()
    (m / "from" / "x").write_text("moved")
    os.rename(m / "from", m / "dir" / "sub" / "to")
    (m / "a").write_text("a")
    (m / "b").mkdir()
    renameat2(m / "a", m / "b", RENAME_EXCHANGE)
    mounted.remount(wipe_cache=True)
    assert (m / "hard").stat().st_nlink == 2
    assert (m / "hard").stat().st_ino == (m / "dir" / "file").stat().st_ino
    assert os.readlink(m / "rel") == "dir/file" and (m / "rel").read_text() == "file"
    assert os.readlink(m / "dangling") == "/nonexistent/abs"
    assert (m / "dir" / "sub" / "to" / "x").read_text() == "moved"
    assert (m / "dir").stat().st_nlink == 3
    assert (m / "dir" / "sub").stat().st_nlink == 3
    assert (m / "a").is_dir() and (m / "b").read_text() == "a"
    assert set(ls_a(m / "dir" / "sub")) == {".", "..", "to"}
    assert ls_a(m / "dir" / "sub")[".."] == (m / "dir").stat().st_ino
    mounted.unmount()


def test_listed_then_removed_directory_is_deleted(shared: Workspace, d: Path) -> None:
    """readdir's "." and ".." hand the kernel no reference: nothing keeps a removed dir alive."""
    sub = d / "sub"
    (sub / "inner").mkdir(parents=True)
    (sub / "f").write_text("f")
    inos = [sub.stat().st_ino, (sub / "inner").stat().st_ino, (sub / "f").stat().st_ino]
    query = f"SELECT id FROM inodes WHERE id IN ({inos[0]}, {inos[1]}, {inos[2]})"
    fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)  # commits the metadata, so the DB shows the rows before they go
    os.close(fd)
    assert len(meta_rows(shared, query)) == 3
    for _ in range(3):
        ls_a(sub)
        ls_a(sub / "inner")
    (sub / "f").unlink()
    (sub / "inner").rmdir()
    sub.rmdir()
    wait_for("the inodes to go with their names", lambda: not meta_rows(shared, query),
             timeout=10)
    assert ls_a(d) == {".": d.stat().st_ino, "..": d.parent.stat().st_ino}


def test_cached_misses_never_hide_new_names(d: Path) -> None:
    """Misses are cached by the kernel for long: every way of making a name must clear them."""
    (d / "src").write_text("s")
    (d / "srcdir").mkdir()
    makers: dict[str, Callable[[Path], object]] = {
        "created": lambda p: p.write_text("c"),
        "made-dir": lambda p: p.mkdir(),
        "symlinked": lambda p: os.symlink("src", p),
        "linked": lambda p: os.link(d / "src", p),
        "renamed-to": lambda p: os.rename(d / "srcdir", p),
        "fifo": lambda p: os.mkfifo(p),
    }
    for name, make in makers.items():
        p = d / name
        assert errno_of(os.stat, p) == errno.ENOENT  # now a cached miss
        assert run_py(f"print(os.path.lexists({str(p)!r}))").stdout.strip() == "False"
        make(p)
        assert run_py(f"print(os.path.lexists({str(p)!r}))").stdout.strip() == "True", name
    os.unlink(d / "created")
    assert run_py(f"print(os.path.lexists({str(d / 'created')!r}))").stdout.strip() == "False"


def drop_kernel_caches() -> None:
    """Make the kernel forget dentries and inodes: the next listing's attributes are the
    ones readdirplus hands it, not what it had cached."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_listings_show_every_change_since_the_last(d: Path) -> None:
    """Listings are served again while no metadata changed (readdir's listing cache): after
    any change, the names and the attributes readdirplus hands the kernel are the new ones."""
    (d / "f").write_bytes(b"0123456789")
    assert {e.name: e.stat().st_size for e in os.scandir(d)} == {"f": 10}
    with open(d / "f", "ab") as h:
        h.write(b"abcde")
        os.fsync(h.fileno())
    (d / "g").touch()
    os.rename(d / "g", d / "h")
    drop_kernel_caches()
    assert {e.name: e.stat().st_size for e in os.scandir(d)} == {"f": 15, "h": 0}
    os.chmod(d / "h", 0o600)
    drop_kernel_caches()
    assert {e.name: stat.S_IMODE(e.stat().st_mode) for e in os.scandir(d)}["h"] == 0o600


def test_a_directory_too_big_for_the_listing_cache_lists_whole(d: Path) -> None:
    names = {f"n{i:05d}" for i in range(LISTING_CACHE_DIR_MAX + 200)}
    for n in names:
        (d / n).touch()
    for _ in range(2):
        entries = ls_a(d)
        assert set(entries) == names | {".", ".."}
        assert len({entries[n] for n in names}) == len(names)
