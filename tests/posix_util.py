"""Helpers shared by the POSIX tests (tests/test_posix_*.py): one mount per module, syscalls.

Most POSIX checks need a mount but not a fresh one, so each test module shares one mount
(`shared`) and every test works in a directory of its own (`d`); a test module imports
`shared_fixture` and `d_fixture` to use them. Tests that prove persistence
use the function-scoped `mounted` fixture from conftest.py and remount on an empty cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Workspace

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = 316  # x86_64
AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
IOCB_CMD_PWRITE = 1


def renameat2(old: Path, new: Path, flags: int) -> None:
    """rename(2) with flags (Python has no wrapper): raises OSError like os.rename."""
    res = _libc.syscall(SYS_RENAMEAT2, AT_FDCWD, os.fsencode(old), AT_FDCWD,
                        os.fsencode(new), flags)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


class _Iocb(ctypes.Structure):  # struct iocb of <linux/aio_abi.h>, little-endian
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


def _checked(res: int) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


class KernelAio:
    """Linux native AIO (io_submit(2)), which Python has no wrapper for: a write submitted
    this way is asynchronous in the kernel (its kiocb is not a synchronous one), unlike a
    pwrite(2) from a thread."""

    def __init__(self) -> None:
        self._ctx = ctypes.c_ulong(0)
        _checked(_libc.syscall(SYS_IO_SETUP, 8, ctypes.byref(self._ctx)))
        self._buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT may want

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """Submit one write, wait for its completion, return its result (bytes written)."""
        self._buf[: len(data)] = data
        cb = _Iocb(opcode=IOCB_CMD_PWRITE, fildes=fd, nbytes=len(data), offset=offset,
                   buf=ctypes.addressof(ctypes.c_char.from_buffer(self._buf)))
        cbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(cb))
        _checked(_libc.syscall(SYS_IO_SUBMIT, self._ctx, ctypes.c_long(1), cbs))
        event = _IoEvent()
        while not _checked(_libc.syscall(SYS_IO_GETEVENTS, self._ctx, ctypes.c_long(1),
                                         ctypes.c_long(1), ctypes.byref(event), None)):
            pass
        if event.res < 0:
            raise OSError(-event.res, os.strerror(-event.res))
        return int(event.res)

    def close(self) -> None:
        _libc.syscall(SYS_IO_DESTROY, self._ctx)
        self._buf.close()


MAX_HANDLE_SZ = 128


class FileHandle(ctypes.Structure):
    """struct file_handle of <fcntl.h>, with room for the largest handle."""

    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle_at(path: Path) -> FileHandle:
    """The handle of the file `path` names (name_to_handle_at(2)); raises OSError."""
    handle = FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(handle),
                               ctypes.byref(mount_id), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return handle


def open_by_handle_at(mount: Path, handle: FileHandle, flags: int) -> int:
    """open_by_handle_at(2) on the filesystem mounted at `mount`: a descriptor, or OSError."""
    mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = int(_libc.open_by_handle_at(mount_fd, ctypes.byref(handle), flags))
    finally:
        os.close(mount_fd)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


@pytest.fixture(scope="module", name="shared")
def shared_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """One workspace mounted for a whole test module (allow_other: some tests drop root)."""
    root = tmp_path_factory.mktemp("posix")
    w = Workspace(root, f"file://{root / 'store'}")
    w.init()
    w.mount("-o", "allow_other")
    yield w
    try:
        w.unmount()  # also fails the module's last test if the daemon logged an error
    finally:
        w.teardown()


@pytest.fixture(name="d")
def d_fixture(shared: Workspace, request: pytest.FixtureRequest) -> Path:
    """A fresh directory of this test's own on the shared mount."""
    name: str = request.node.name
    path = shared.mnt / name.replace("/", "_")[:200]
    path.mkdir()
    return path


def meta_rows(w: Workspace, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Query the live metadata DB read-only (WAL lets a reader in beside the daemon)."""
    conn = sqlite3.connect(f"file:{w.cache_dir / 'meta.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def run_py(code: str, *, uid: int | None = None, gid: int | None = None,
           cwd: Path | None = None, umask: int | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run Python code in a separate process, optionally as an unprivileged user.

    The process starts as root, changes to `cwd` (pytest's tmp dirs are 0700, so an
    unprivileged user could not walk there), then drops to uid/gid with no supplementary
    groups; the code then uses paths relative to `cwd`.
    """
    prelude = "import os, sys, errno\n"
    if cwd is not None:
        prelude += f"os.chdir({str(cwd)!r})\n"
    if umask is not None:
        prelude += f"os.umask({umask})\n"
    if uid is not None:
        prelude += f"os.setgroups([]); os.setgid({gid if gid is not None else uid}); " \
                   f"os.setuid({uid})\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                            text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr}")
    return result


def errno_of(fn: object, *args: object) -> int:
    """The errno an OSError-raising call fails with (0 if it succeeds)."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return int(e.errno or 0)
    return 0
