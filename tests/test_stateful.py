"""Random operations on a wsfs mount and on a local directory must leave the same tree.

A Hypothesis state machine applies each operation (create, write at offsets around the block
boundary and past EOF, truncate, rename (also with NOREPLACE and EXCHANGE), link, symlink,
unlink, mkdir, rmdir, chmod, xattrs, and I/O through handles kept open meanwhile) to both a
directory on the real disk and a directory on the mount. Both must fail with the same errno or
both succeed, and after every step the two trees must be equal in everything but inode
numbers and times. Now and then, and at the end of every run, the workspace is remounted
on an empty cache dir, and the tree must still be equal.

Shrinking is off by default (each example costs remounts); set WSFS_SHRINK=1 to shrink a
failure to its shortest program, and WSFS_STATEFUL_EXAMPLES=N to run more examples.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Workspace
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from treecompare import assert_same, snapshot

BS = 1 << 20  # the default block size
NAMES = ("a", "b", "c")
UNFAIR = ("mtime_ns", "atime_ns")  # set from two clocks: equal only by chance
REMOUNT_EVERY = 12  # steps between mid-run remounts, at least

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
offsets = st.one_of(
    st.integers(0, 9000),
    st.sampled_from([BS - 7, BS - 1, BS, BS + 5, 2 * BS - 3]),  # across the block boundary
)
sizes = st.one_of(st.integers(0, 300), st.sampled_from([4096, 70_000]))
truncate_sizes = st.one_of(st.integers(0, 9000), st.sampled_from([BS - 1, BS, BS + 1, 2 * BS]))
modes = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o444, 0o2775, 0o4755, 0o1777])
xattr_names = st.sampled_from(["user.a", "user.b"])


MAX_OPEN = 3  # file descriptors kept open across steps (one pair per open file)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
libc = ctypes.CDLL(None, use_errno=True)


def data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """rename(2) with flags, which Python's os module does not offer."""
    if libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


class FsMachine(RuleBasedStateMachine):
    """Applies each operation to the local tree and to the mounted tree, in that order."""

    ws: Workspace
    local_root: Path
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        FsMachine.runs += 1
        name = f"run{FsMachine.runs}"
        self.local = self.local_root / name
        self.remote = self.ws.mnt / name
        self.since_remount = 0
        self.fds: list[tuple[int, int]] = []  # (local fd, wsfs fd) of one file, opened together

    @initialize()
    def make_roots(self) -> None:
        self.local.mkdir(parents=True)
        self.remote.mkdir()

    def both(self, what: str, op: Callable[[Path], object]) -> None:
        """Run `op` on both roots; their outcomes (success or errno) must be the same."""
        outcomes: list[str] = []
        for root in (self.local, self.remote):
            try:
                op(root)
                outcomes.append("ok")
            except OSError as e:
                outcomes.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
        self.since_remount += 1
        assert outcomes[0] == outcomes[1], (
            f"{what}: the local disk says {outcomes[0]}, wsfs says {outcomes[1]}")

    # -- the operations ------------------------------------------------------------------------

    @rule(path=paths, seed=st.integers(0, 255), size=sizes)
    def create(self, path: str, seed: int, size: int) -> None:
        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data(seed, size))
            finally:
                os.close(fd)
        self.both(f"create {path} with {size} bytes", op)

    @rule(path=paths, offset=offsets, seed=st.integers(0, 255), size=sizes)
    def write(self, path: str, offset: int, seed: int, size: int) -> None:
        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                assert os.pwrite(fd, data(seed, size), offset) == size
            finally:
                os.close(fd)
        self.both(f"write {size} bytes at {offset} into {path}", op)

    @rule(path=paths, seed=st.integers(0, 255), size=st.integers(1, 200))
    def append(self, path: str, seed: int, size: int) -> None:
        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data(seed, size))
            finally:
                os.close(fd)
        self.both(f"append {size} bytes to {path}", op)

    @rule(path=paths, size=truncate_sizes)
    def truncate(self, path: str, size: int) -> None:
        self.both(f"truncate {path} to {size}", lambda root: os.truncate(root / path, size))

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(f"rename {src} to {dst}", lambda root: os.rename(root / src, root / dst))

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(f"link {src} as {dst}", lambda root: os.link(root / src, root / dst))

    @rule(dest=st.one_of(paths, st.sampled_from(["nowhere", "a/../b"])), path=paths)
    def symlink(self, dest: str, path: str) -> None:
        self.both(f"symlink {path} -> {dest}", lambda root: os.symlink(dest, root / path))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(f"unlink {path}", lambda root: os.unlink(root / path))

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(f"mkdir {path}", lambda root: os.mkdir(root / path))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(f"rmdir {path}", lambda root: os.rmdir(root / path))

    @rule(path=paths, mode=modes)
    def chmod(self, path: str, mode: int) -> None:
        self.both(f"chmod {path} {mode:o}", lambda root: os.chmod(root / path, mode))

    @rule(path=paths, name=xattr_names, seed=st.integers(0, 255), size=st.integers(0, 100))
    def setxattr(self, path: str, name: str, seed: int, size: int) -> None:
        value = data(seed, size)
        self.both(f"setxattr {path} {name} ({size} bytes)",
                  lambda root: os.setxattr(root / path, name, value))

    @rule(path=paths, name=xattr_names)
    def removexattr(self, path: str, name: str) -> None:
        self.both(f"removexattr {path} {name}", lambda root: os.removexattr(root / path, name))

    @rule(src=paths, dst=paths, flags=st.sampled_from([RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename2(self, src: str, dst: str, flags: int) -> None:
        what = "noreplace" if flags == RENAME_NOREPLACE else "exchange"
        self.both(f"rename {src} to {dst} ({what})",
                  lambda root: renameat2(root / src, root / dst, flags))

    # -- open files: written, read and truncated while renamed or unlinked by other steps ------

    @precondition(lambda self: len(self.fds) < MAX_OPEN)
    @rule(path=paths)
    def open_file(self, path: str) -> None:
        opened: list[int] = []
        self.both(f"open {path}",
                  lambda root: opened.append(os.open(root / path, os.O_RDWR)))
        if len(opened) == 2:
            self.fds.append((opened[0], opened[1]))
        else:
            for fd in opened:
                os.close(fd)

    def _pair(self, i: int) -> tuple[int, int]:
        return self.fds[i % len(self.fds)]

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN - 1), offset=offsets, seed=st.integers(0, 255), size=sizes)
    def fd_write(self, i: int, offset: int, seed: int, size: int) -> None:
        buf = data(seed, size)
        for fd in self._pair(i):
            assert os.pwrite(fd, buf, offset) == size

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN - 1), size=truncate_sizes)
    def fd_truncate(self, i: int, size: int) -> None:
        for fd in self._pair(i):
            os.ftruncate(fd, size)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN - 1), offset=offsets, size=sizes)
    def fd_read(self, i: int, offset: int, size: int) -> None:
        """Read through the open handle, even when no name leads to the file any more."""
        local, remote = self._pair(i)
        assert os.pread(remote, size, offset) == os.pread(local, size, offset)
        ls, rs = os.fstat(local), os.fstat(remote)
        assert (rs.st_size, rs.st_nlink, rs.st_mode) == (ls.st_size, ls.st_nlink, ls.st_mode)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, MAX_OPEN - 1))
    def close_file(self, i: int) -> None:
        for fd in self.fds.pop(i % len(self.fds)):
            os.close(fd)

    def close_all(self) -> None:
        while self.fds:
            for fd in self.fds.pop():
                os.close(fd)

    @precondition(lambda self: self.since_remount >= REMOUNT_EVERY)
    @rule()
    def remount(self) -> None:
        """A fresh machine mid-run: everything so far must come back from the store."""
        self.close_all()
        self.ws.remount(wipe_cache=True)
        self.since_remount = 0

    # -- the checks ----------------------------------------------------------------------------

    @invariant()
    def trees_are_equal(self) -> None:
        if not self.local.exists():
            return  # before make_roots
        assert_same(snapshot(self.local), snapshot(self.remote), ignore=UNFAIR,
                    what="local disk vs wsfs")

    def teardown(self) -> None:
        self.close_all()
        if not self.local.exists():
            return
        self.ws.remount(wipe_cache=True)
        assert_same(snapshot(self.local), snapshot(self.remote), ignore=UNFAIR,
                    what="local disk vs wsfs after a cache-wiping remount")


EXAMPLES = int(os.environ.get("WSFS_STATEFUL_EXAMPLES", "15"))  # more for a soak run
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("WSFS_SHRINK"):
    PHASES.append(Phase.shrink)


@pytest.mark.timeout(900)
def test_random_operations_match_a_local_disk(ws: Workspace, tmp_path: Path) -> None:
    ws.mount()

    class Machine(FsMachine):
        pass

    Machine.ws = ws
    Machine.local_root = tmp_path / "local"
    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                          database=None, phases=PHASES, print_blob=True,
                          suppress_health_check=list(HealthCheck)),
    )
    ws.unmount()
