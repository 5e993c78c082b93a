"""The FUSE requests pyfuse3 has no handler for: FALLOCATE and LSEEK.

pyfuse3 (3.5, the newest; its development branch too) gives libfuse a table of low-level
handlers (`struct fuse_lowlevel_ops`) without `fallocate` and `lseek`, and its Operations class
has no method for them. libfuse answers such a request ENOSYS, and the kernel, told so once,
stops sending it for the mount's life: fallocate(2) fails with EOPNOTSUPP (glibc's
posix_fallocate(3) then writes a zero byte into every 4 KiB of the range instead) and
SEEK_DATA/SEEK_HOLE see the whole file as data.

`add_handlers` puts the two handlers into the table of the session pyfuse3 created, after
pyfuse3.init() and before pyfuse3.main() reads the first request:

1. pyfuse3 keeps the session, and its own table, in two statics of its extension module
   (`__pyx_v_7pyfuse3_session`, `__pyx_v_7pyfuse3_fuse_ops`). Neither is exported: their
   addresses come from the module's ELF symbol table (pip builds it unstripped) plus its
   load address (dlinfo(3)).
2. fuse_session_new() copied pyfuse3's table into libfuse's private session struct. The copy
   is found by content: the exact bytes of pyfuse3's table, exactly once, inside the
   session's allocation (malloc_usable_size(3)). The two slots come from the public,
   append-only ABI of fuse_lowlevel.h: `fallocate` is the 41st pointer, `lseek` the 44th,
   and both must still be empty.
3. The handlers are ctypes callbacks. libfuse calls them from fuse_session_process_buf() in
   the trio thread (pyfuse3's loop, which holds the GIL); each starts a task in the mount's
   nursery and returns at once, and the task answers with fuse_reply_err or
   fuse_reply_lseek, exactly once, whatever happens (the nursery ends before pyfuse3.close()
   destroys the session).

Anything unexpected (a stripped module, another libfuse, a table not found exactly once, a
slot already taken) writes nothing and is logged: the mount then behaves as it would without
this module. Nothing is written before every check has passed.

What the kernel's FUSE client sends at all is its choice: FALLOC_FL_COLLAPSE_RANGE and
FALLOC_FL_INSERT_RANGE (and every mode but KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE) are refused
with EOPNOTSUPP by fs/fuse/file.c before any daemon hears of them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import pyfuse3
import trio

log = logging.getLogger(__name__)

SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
OPS_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
FALLOCATE_SLOT = 40  # pointer index in struct fuse_lowlevel_ops (libfuse 3.0 and later)
LSEEK_SLOT = 43  # (libfuse 3.8 and later)
RTLD_DI_LINKMAP = 2

_FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int,
                          ctypes.c_void_p)


class RangeHandlers(Protocol):
    """What answers the two requests (fs.Operations): FUSEError carries the errno."""

    nursery: trio.Nursery | None

    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None: ...

    async def lseek(self, inode: int, offset: int, whence: int) -> int: ...


def elf_symbols(path: str | Path, names: set[bytes]) -> dict[bytes, tuple[int, int]]:
    """(value, size) of the named symbols of an ELF64 little-endian file's symbol table."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (type, offset, size, link, entsize) of each section header
    sections = [struct.unpack_from("<4xI16xQQI12xQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    found: dict[bytes, tuple[int, int]] = {}
    for kind, offset, size, link, entsize in sections:
        if kind != 2 or not entsize:  # SHT_SYMTAB
            continue
        strings = sections[link][1]
        for sym in range(offset, offset + size, entsize):
            name_at, value, sym_size = struct.unpack_from("<I4xQQ", data, sym)
            start = strings + name_at
            name = data[start : data.index(b"\0", start)]
            if name in names:
                found[name] = (value, sym_size)
    return found


def _load_address(path: str) -> int:
    """Where the already loaded shared object `path` is mapped (its link_map's l_addr)."""
    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    libc = ctypes.CDLL(None)
    link_map = ctypes.c_void_p()
    if libc.dlinfo(ctypes.c_void_p(lib._handle), RTLD_DI_LINKMAP, ctypes.byref(link_map)):
        raise OSError("dlinfo failed")
    assert link_map.value is not None
    return ctypes.c_size_t.from_address(link_map.value).value


def _session_table() -> ctypes.Array[ctypes.c_void_p]:
    """libfuse's copy of pyfuse3's handler table, inside the live session (see the module
    docstring); raises LookupError, naming why, when it cannot be found with certainty."""
    module = pyfuse3.__file__
    assert module is not None
    symbols = elf_symbols(module, {SESSION_SYMBOL, OPS_SYMBOL})
    if len(symbols) != 2:
        raise LookupError(f"{module} has no symbol table with pyfuse3's session")
    base = _load_address(module)
    ops_at, ops_size = symbols[OPS_SYMBOL]
    slots = ops_size // ctypes.sizeof(ctypes.c_void_p)
    if slots <= LSEEK_SLOT:
        raise LookupError(f"pyfuse3's handler table has {slots} slots only")
    session = ctypes.c_void_p.from_address(base + symbols[SESSION_SYMBOL][0]).value
    if not session:
        raise LookupError("pyfuse3 has no session yet")
    libc = ctypes.CDLL(None)
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    size = libc.malloc_usable_size(session)
    table = ctypes.string_at(base + ops_at, ops_size)
    inside = ctypes.string_at(session, size)
    at = inside.find(table)
    if at < 0 or inside.find(table, at + 1) >= 0 or at % ctypes.sizeof(ctypes.c_void_p):
        raise LookupError("libfuse's session holds no single copy of pyfuse3's table")
    copy = (ctypes.c_void_p * slots).from_address(session + at)
    if copy[FALLOCATE_SLOT] or copy[LSEEK_SLOT]:
        raise LookupError("the session has a fallocate or lseek handler already")
    return copy


class _Replies:
    """libfuse's reply functions, from the libfuse3 pyfuse3 was loaded with."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libfuse3.so.3", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        self.err = lib.fuse_reply_err
        self.err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.err.restype = ctypes.c_int
        self.lseek = lib.fuse_reply_lseek
        self.lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.lseek.restype = ctypes.c_int


# The callbacks libfuse holds: alive for the process's life (a session may call them until
# pyfuse3.close()).
_installed: list[object] = []


def add_handlers(ops: RangeHandlers) -> bool:
    """Give the session pyfuse3 created the fallocate and lseek handlers of `ops`; False
    (logged) when that cannot be done safely, and the mount goes on without them."""
    try:
        table = _session_table()
        replies = _Replies()
    except (OSError, LookupError, ValueError, AttributeError, struct.error) as e:
        log.warning("fallocate(2) and SEEK_DATA/SEEK_HOLE stay unsupported: %s", e)
        return False

    def start(req: int, answer: Callable[[], Awaitable[int | None]], reply: Callable[[int], None]
              ) -> None:
        """Run `answer` in a task of the mount's nursery and reply with its result or errno;
        runs inside libfuse, so it never raises."""
        async def run() -> None:
            result: int | None = None
            err = errno.EIO
            try:
                result = await answer()
                err = 0
            except pyfuse3.FUSEError as e:
                err = e.errno
            except trio.Cancelled:  # the unmount: the kernel has given up on it already
                err = errno.EINTR
                raise
            except BaseException:  # a bug that fs's _guarded let through
                log.exception("a fallocate or lseek request failed")
                raise
            finally:
                if err or result is None:
                    replies.err(req, err)
                else:
                    reply(result)

        try:
            if ops.nursery is None:
                raise RuntimeError("not serving")
            ops.nursery.start_soon(run)
        except BaseException:
            log.exception("cannot answer a fallocate or lseek request")
            replies.err(req, errno.EIO)

    def fallocate(req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        start(req, lambda: ops.fallocate(ino, mode, offset, length), lambda _: None)

    def lseek(req: int, ino: int, offset: int, whence: int, fi: int) -> None:
        start(req, lambda: ops.lseek(ino, offset, whence), lambda off: replies.lseek(req, off))

    callbacks = (_FALLOCATE(fallocate), _LSEEK(lseek))
    _installed.append((callbacks, replies))
    table[FALLOCATE_SLOT] = ctypes.cast(callbacks[0], ctypes.c_void_p).value
    table[LSEEK_SLOT] = ctypes.cast(callbacks[1], ctypes.c_void_p).value
    log.debug("fallocate and lseek handlers added to libfuse's session")
    return True
