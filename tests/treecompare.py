"""Snapshot a directory tree attribute by attribute, and diff two snapshots readably.

A snapshot is what a user would call "the workspace": every path with its type, mode, owner,
size, times, symlink target, hard-link group, user xattrs and a hash of its content, plus
whether a big file is sparse. Two snapshots of the same tree taken on different filesystems
(a local ext4 directory and a wsfs mount, before and after a remount on an empty cache) must
compare equal, except for fields that honestly differ between filesystems (a directory's
st_size, inode numbers) or that a comparison chooses to ignore (times in the stateful test).

Reading content uses O_NOATIME where allowed, so that snapshotting a tree does not change the
atimes that a later snapshot compares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 20
SPARSE_MIN_SIZE = 8 << 20  # below this, "is it sparse" is a filesystem detail, not data

# Fields that every comparison checks unless told to ignore them.
ALL_FIELDS = ("type", "mode", "uid", "gid", "size", "nlink", "mtime_ns", "atime_ns", "target",
              "links", "xattrs", "sha256", "sparse")


@dataclass(frozen=True)
class Entry:
    """One path of a tree, as seen by lstat(2) and friends."""

    type: str  # "file", "dir", "symlink" or "other"
    mode: int  # the full st_mode, type bits included
    uid: int
    gid: int
    size: int | None  # None for directories: their st_size is a filesystem detail
    nlink: int
    mtime_ns: int
    atime_ns: int
    ino: int
    target: str | None = None  # symlinks only
    links: tuple[str, ...] = ()  # the other paths in this tree that name the same inode
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sha256: str | None = None  # regular files, when content was hashed
    sparse: bool | None = None  # regular files of at least SPARSE_MIN_SIZE
    blocks: int = 0  # st_blocks, for messages


@dataclass
class Snapshot:
    """Entries by path relative to the root ("." is the root itself)."""

    root: Path
    entries: dict[str, Entry] = field(default_factory=dict)

    def paths(self) -> list[str]:
        return sorted(self.entries)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every path below root (root first, as "."), never following symlinks."""
    yield ".", root
    stack = [(Path(), root)]
    while stack:
        rel, path = stack.pop()
        for name in _listdir(path):
            child = path / name
            crel = rel / name
            yield str(crel), child
            if stat.S_ISDIR(os.lstat(child).st_mode):
                stack.append((crel, child))


def _listdir(path: Path) -> list[str]:
    """A directory's names, read without touching its atime (O_NOATIME where allowed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def _xattrs(path: Path, prefixes: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in sorted(names):
        if name.startswith(prefixes):
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(out)


def file_sha256(path: Path) -> str:
    """Hash a file's content without touching its atime (O_NOATIME where allowed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path | str, *, content: bool = True,
             xattr_prefixes: tuple[str, ...] = ("user.",),
             exclude: Iterable[str] = ()) -> Snapshot:
    """Take a snapshot of the tree at `root`.

    Every lstat happens before any content is read, so atimes are those of the tree as it was
    handed to us. `exclude` names relative paths to leave out (with everything below them).
    """
    root = Path(root)
    excluded = set(exclude)
    stats: dict[str, tuple[Path, os.stat_result]] = {}
    for rel, path in _walk(root):
        if rel in excluded or any(rel.startswith(e + "/") for e in excluded):
            continue
        stats[rel] = (path, os.lstat(path))
    by_inode: dict[int, list[str]] = {}
    for rel, (_, st) in stats.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault(st.st_ino, []).append(rel)
    snap = Snapshot(root)
    for rel, (path, st) in stats.items():
        kind = _kind(st.st_mode)
        sha = None
        sparse = None
        if kind == "file":
            if content:
                sha = file_sha256(path)
            if st.st_size >= SPARSE_MIN_SIZE:
                sparse = st.st_blocks * 512 < st.st_size // 2
        snap.entries[rel] = Entry(
            type=kind,
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            size=None if kind == "dir" else st.st_size,
            nlink=st.st_nlink,
            mtime_ns=st.st_mtime_ns,
            atime_ns=st.st_atime_ns,
            ino=st.st_ino,
            target=os.readlink(path) if kind == "symlink" else None,
            links=tuple(sorted(p for p in by_inode.get(st.st_ino, []) if p != rel))
            if kind != "dir" else (),
            xattrs=_xattrs(path, xattr_prefixes) if kind != "symlink" else (),
            sha256=sha,
            sparse=sparse,
            blocks=st.st_blocks,
        )
    return snap


def _show(name: str, value: object) -> str:
    if name == "mode" and isinstance(value, int):
        return oct(value)
    if name == "xattrs" and isinstance(value, tuple):
        return "{" + ", ".join(f"{k}={v[:40]!r}" for k, v in value) + "}"
    return repr(value)


def diff(expected: Snapshot, actual: Snapshot, *, ignore: Iterable[str] = (),
         ignore_paths: Iterable[str] = (), root_fields: Iterable[str] | None = None
         ) -> list[str]:
    """Human-readable differences between two snapshots, one line each (empty: the same).

    `ignore` names Entry fields not to compare; `root_fields`, when given, is the only set of
    fields compared for the root "." (a mountpoint's root is not the copied directory's).
    """
    skip = set(ignore)
    skip_paths = set(ignore_paths)
    fields = [f.name for f in dataclasses.fields(Entry)
              if f.name in ALL_FIELDS and f.name not in skip]
    out: list[str] = []
    exp_paths, act_paths = set(expected.entries), set(actual.entries)
    for p in sorted(exp_paths - act_paths - skip_paths):
        out.append(f"missing: {p} ({expected.entries[p].type})")
    for p in sorted(act_paths - exp_paths - skip_paths):
        out.append(f"unexpected: {p} ({actual.entries[p].type})")
    for p in sorted(exp_paths & act_paths - skip_paths):
        e, a = expected.entries[p], actual.entries[p]
        check = fields
        if p == "." and root_fields is not None:
            check = [f for f in fields if f in set(root_fields)]
        if e.type != a.type:
            out.append(f"{p}: type {e.type} != {a.type}")
            continue
        for name in check:
            if name == "sha256" and (e.sha256 is None or a.sha256 is None):
                continue
            ev, av = getattr(e, name), getattr(a, name)
            if name == "atime_ns" and e.type == "symlink":
                continue  # readlink(2) sets it on most filesystems: it is not data
            if ev != av:
                extra = f" (st_blocks {e.blocks} vs {a.blocks})" if name == "sparse" else ""
                out.append(f"{p}: {name} {_show(name, ev)} != {_show(name, av)}{extra}")
    return out


def assert_same(expected: Snapshot, actual: Snapshot, *, what: str = "", **kw: object) -> None:
    """Fail with every difference listed (the first 40) when the snapshots differ."""
    problems = diff(expected, actual, **kw)  # type: ignore[arg-type]
    if problems:
        head = f"{what}: " if what else ""
        more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise AssertionError(
            f"{head}{len(problems)} differences between {expected.root} and {actual.root}:\n"
            + "\n".join(problems[:40]) + more)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
