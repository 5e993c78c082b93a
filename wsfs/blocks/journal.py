"""The data journal: an fsync(2) of a few small writes costs one disk flush, not one per block.

A random writer (SQLite, git's index, a pip install's records) changes a few KiB in several
blocks between two fsyncs. Syncing each block's file is a disk flush and a worker thread's
round trip each: eight blocks and the metadata WAL took ~2.5 ms, one file ~0.7 ms. So the
bytes such an fsync covers are appended to this one file instead, which is then synced
once; the blocks' own files are written as always and reach the disk on the kernel's
schedule. After a crash of the machine, recovery replays the journal into the blocks' files
before anything reads them. (A crash of the daemon alone loses nothing either way: its
writes are in the page cache.)

Layout: a header at offset 0, records from HEADER_SIZE on, each checksummed:

    header:  MAGIC | u64 epoch | u32 crc32
    record:  RECORD | u64 epoch | u8 id length | u32 offset | u32 length | id | data | u32 crc32

Rules that keep a replay from ever undoing an acknowledged write:

1. Replay applies, in order, the valid records of the header's epoch to the blocks the
   metadata still awaits the upload of, and stops at the first record that is not valid
   (torn, or left from an earlier epoch): records are written in order before the sync
   that acknowledges them, so nothing after a torn record was acknowledged.
2. A block with a record in the current epoch (`live`) is made durable through the journal
   only, until the epoch ends: were its file synced directly after newer writes, a replay
   of the older record would put the older bytes back.
3. An epoch ends (a new header) only after every metadata change is durable, and either
   when none of its blocks is dirty any more (a block dropped by a change a crash could
   undo would come back without its bytes), or once every one of its dirty blocks' files
   has been synced; then the new header is synced before the fsync that needed it returns.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from .files import pwrite_all

log = logging.getLogger(__name__)

MAGIC = b"WSFSJRN1"
RECORD = b"WJR1"
_HEADER = struct.Struct(">8sQ")
_RECORD = struct.Struct(">4sQBII")
_CRC = struct.Struct(">I")
HEADER_SIZE = 4096  # the header has a page of its own: rewriting it never tears a record
JOURNAL_MAX = 16 << 20  # bytes of records per epoch; beyond, fsyncs sync blocks' files
RECORD_OVERHEAD = _RECORD.size + 255 + _CRC.size  # at most, beside the data
FSYNC_MAX = 256 << 10  # an fsync covering more new bytes syncs the blocks' files instead
# The file is grown by writing zeros this far ahead of the records: an fdatasync of bytes
# overwritten inside a file's written length flushes only them, while one of an append (or of
# a write into space fallocate(2) reserved) must also commit the file's new extent: ~0.85 ms
# median against ~0.3 ms on our hosts' disks.
GROW = 1 << 20


class Journal:
    """The journal file of a cache dir (see the module docstring); the trio thread appends
    and restarts, worker threads sync."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size  # written so far (records or zeros)
        self.epoch = 0
        self.end = HEADER_SIZE  # where the next record goes
        self.live: set[str] = set()  # blocks with records in this epoch (rule 2)
        # Blocks of `live` dropped this epoch (`hold_again` may restore them), and how many
        # were dropped so far: an epoch's end waits until none was dropped meanwhile (rule 3).
        self.dropped: set[str] = set()
        self.drops = 0

    def close(self) -> None:
        os.close(self.fd)

    # -- recovery (blocking) ----------------------------------------------------------------

    def replay(self, dirty_dir: Path, wanted: Callable[[str], bool]) -> None:
        """Write every record of the current epoch whose block is `wanted` (awaits upload)
        into the block's file in `dirty_dir`, sync those files, and start a new epoch.

        A wanted block's file that is missing is created: a machine crash may lose a new
        file's name along with its pages.
        """
        fds: dict[str, int | None] = {}  # None: not wanted
        try:
            for block_id, offset, data in self.records():
                if block_id not in fds:
                    fds[block_id] = None if not wanted(block_id) else os.open(
                        dirty_dir / block_id, os.O_RDWR | os.O_CREAT, 0o600)
                fd = fds[block_id]
                if fd is not None:
                    pwrite_all(fd, data, offset)
            touched = {b: fd for b, fd in fds.items() if fd is not None}
            for fd in touched.values():
                os.fdatasync(fd)
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
        if touched:
            log.warning("replayed the data journal into %d dirty blocks after a crash",
                        len(touched))
        self.restart()
        self.sync()

    def records(self) -> list[tuple[str, int, bytes]]:
        """The records a replay applies now (block id, offset, data), in order (rule 1);
        `epoch` becomes the header's."""
        out: list[tuple[str, int, bytes]] = []
        epoch = _valid_header(os.pread(self.fd, _HEADER.size + _CRC.size, 0))
        if epoch is None:
            return out
        self.epoch = epoch
        pos = HEADER_SIZE
        size = os.fstat(self.fd).st_size
        while pos + _RECORD.size <= size:
            head = os.pread(self.fd, _RECORD.size, pos)
            magic, epoch, id_len, offset, length = _RECORD.unpack(head)
            if magic != RECORD or epoch != self.epoch:
                break
            rest = os.pread(self.fd, id_len + length + _CRC.size, pos + _RECORD.size)
            if len(rest) != id_len + length + _CRC.size:
                break
            (crc,) = _CRC.unpack_from(rest, id_len + length)
            if zlib.crc32(rest[: id_len + length], zlib.crc32(head)) != crc:
                break
            block_id = rest[:id_len].decode("ascii", "replace")
            if not block_id.isalnum():  # never a path: ids are hex
                break
            out.append((block_id, offset, rest[id_len : id_len + length]))
            pos += _RECORD.size + id_len + length + _CRC.size
        return out

    # -- appending (trio thread) -----------------------------------------------------------

    @property
    def has_records(self) -> bool:
        """Whether this epoch holds records (its end then has rules to keep: rule 3)."""
        return self.end > HEADER_SIZE

    def fits(self, count: int, nbytes: int) -> bool:
        """Whether `count` records holding `nbytes` of data fit in this epoch."""
        return self.end + nbytes + count * RECORD_OVERHEAD <= HEADER_SIZE + JOURNAL_MAX

    def grows(self, count: int, nbytes: int) -> bool:
        """Whether appending `count` records of `nbytes` would grow the file (by GROW)."""
        return self.end + nbytes + count * RECORD_OVERHEAD > self.size

    def append(self, records: list[tuple[str, int, bytes]]) -> None:
        """Write records (block id, offset, data) into the page cache; `sync` makes them
        durable. On a failure (a full disk) nothing counts: the next append overwrites it."""
        parts: list[bytes] = []
        for block_id, offset, data in records:
            bid = block_id.encode("ascii")
            head = _RECORD.pack(RECORD, self.epoch, len(bid), offset, len(data))
            crc = zlib.crc32(data, zlib.crc32(bid, zlib.crc32(head)))
            parts += (head, bid, data, _CRC.pack(crc))
        blob = b"".join(parts)
        if self.end + len(blob) > self.size:
            grown = (self.end + len(blob) + GROW) // GROW * GROW
            pwrite_all(self.fd, bytes(grown - self.size), self.size)
            self.size = grown
        pwrite_all(self.fd, blob, self.end)
        self.end += len(blob)
        self.live.update(block_id for block_id, _, _ in records)

    def let_go(self, block_id: str) -> None:
        """A dirty block was dropped: it is no longer held (rule 2), and the drop must be
        durable before the epoch may end (rule 3: else a crash would bring the block back
        without the bytes only its records held)."""
        if block_id in self.live:
            self.live.discard(block_id)
            self.dropped.add(block_id)
            self.drops += 1

    def hold_again(self, block_id: str) -> None:
        """A rollback brought back a block dropped this epoch: its fsynced bytes may be in
        the journal only, so it is held again."""
        if block_id in self.dropped:
            self.live.add(block_id)

    def restart(self) -> None:
        """End the epoch: the records written so far stop counting once the new header is
        on the disk (the next `sync`). See rule 3 for when this is allowed."""
        self.epoch += 1
        header = _HEADER.pack(MAGIC, self.epoch)
        page = (header + _CRC.pack(zlib.crc32(header))).ljust(HEADER_SIZE, b"\0")
        pwrite_all(self.fd, page, 0)
        self.size = max(self.size, HEADER_SIZE)
        self.end = HEADER_SIZE
        self.live.clear()
        self.dropped.clear()

    def sync(self) -> None:
        """fdatasync the journal (blocking): the records appended before it are durable."""
        os.fdatasync(self.fd)


def _valid_header(header: bytes) -> int | None:
    if len(header) < _HEADER.size + _CRC.size:
        return None
    magic, epoch = _HEADER.unpack_from(header)
    (crc,) = _CRC.unpack_from(header, _HEADER.size)
    if magic != MAGIC or zlib.crc32(header[: _HEADER.size]) != crc:
        return None
    return int(epoch)
