"""The data journal: an fsync(2) of a few small writes costs one disk flush, not one per block.

A random writer (SQLite, git's index, a pip install's records) changes a few KiB in several
blocks between two fsyncs. Syncing each block's file is a disk flush and a worker thread's
round trip each: eight blocks and the metadata WAL took ~2.5 ms, one file ~0.7 ms. So the
bytes such an fsync covers are appended to this one file instead, which is then synced
once; the blocks' own files are written as always and reach the disk on the kernel's
schedule. After a crash of the machine, recovery replays the journal into the blocks' files
before anything reads them. (A crash of the daemon alone loses nothing either way: its
writes are in the page cache.)

Layout: two halves, each a header page and up to JOURNAL_MAX bytes of records, each
record checksummed. An epoch's records fill one half; when it is full the next epoch starts
in the other half at once, and the full one is retired in the background (rule 3), so no
fsync waits for the blocks its records cover to be synced (with one half, the fsync that
found it full synced every block it held: 50-250 ms for a random writer of a 256 MiB file).

    header:  MAGIC | u64 epoch | u32 crc32            (a half without one is free)
    record:  RECORD | u64 epoch | u8 id length | u32 offset | u32 length | id | data | u32 crc32

Rules that keep a replay from ever undoing an acknowledged write:

1. Replay applies the halves with a valid header in the order of their epochs; in each, in
   order, the valid records of its epoch, to the blocks the metadata still awaits the upload
   of, stopping at the first record that is not valid (torn, or left from an earlier epoch):
   records are written in order before the sync that acknowledges them, so nothing after a
   torn record was acknowledged.
2. A block with a record in an epoch not yet retired (`holds`) is made durable through the
   journal only, until that epoch is retired: were its file synced directly after newer
   writes, a replay of the older record would put the older bytes back.
3. An epoch ends (its header overwritten: by a new epoch's in the same half, or by zeros when
   the other half took over) only after every metadata change is durable, and either when
   none of its blocks is dirty any more (a block dropped by a change a crash could undo would
   come back without its bytes), or once every one of its dirty blocks' files has been synced
   since its last record; the new header (or the zeros) is synced before the fsync that
   needed it returns. At most two epochs are unretired: a half fills only once the other is
   free again.
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
JOURNAL_MAX = 16 << 20  # bytes of records per epoch (a half); then the other half takes over
RECORD_OVERHEAD = _RECORD.size + 255 + _CRC.size  # at most, beside the data
FSYNC_MAX = 256 << 10  # an fsync covering more new bytes syncs the blocks' files instead
# A half is grown by writing zeros this far ahead of the records: an fdatasync of bytes
# overwritten inside a file's written length flushes only them, while one of an append (or of
# a write into space fallocate(2) reserved) must also commit the file's new extent: ~0.85 ms
# median against ~0.3 ms on our hosts' disks.
GROW = 1 << 20


class Epoch:
    """An epoch of the journal: its number, its half, and the blocks it holds."""

    __slots__ = ("dropped", "half", "live", "number")

    def __init__(self, number: int, half: int) -> None:
        self.number = number
        self.half = half
        self.live: set[str] = set()  # blocks with records in this epoch (rule 2)
        self.dropped: set[str] = set()  # blocks of `live` dropped (`hold_again` restores them)


class Journal:
    """The journal file of a cache dir (see the module docstring); the trio thread appends,
    switches halves and ends epochs, worker threads sync."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = os.fstat(self.fd).st_size
        # Where the bytes written (records or zeros) in each half end, an offset in the file:
        # the halves grow separately, and the first may have a hole where the second begins.
        self.written = [_written(self.fd, half, size) for half in (0, 1)]
        self.current = Epoch(0, 0)
        self.older: Epoch | None = None  # the full epoch being retired, if any
        self.end = HEADER_SIZE  # where the next record goes, in the current half
        # How many held blocks were dropped so far: an epoch's end waits until none was
        # dropped meanwhile (rule 3).
        self.drops = 0

    def close(self) -> None:
        os.close(self.fd)

    @property
    def epoch(self) -> int:
        return self.current.number

    @property
    def live(self) -> set[str]:
        """The blocks the current epoch holds."""
        return self.current.live

    def holds(self, block_ids: list[str]) -> bool:
        """Whether an unretired epoch holds any of these blocks (rule 2)."""
        return any(b in self.current.live or (self.older is not None and b in self.older.live)
                   for b in block_ids)

    # -- recovery (blocking) ----------------------------------------------------------------

    def replay(self, dirty_dir: Path, wanted: Callable[[str], bool]) -> None:
        """Write every record of the unretired epochs whose block is `wanted` (awaits upload)
        into the block's file in `dirty_dir`, sync those files, and start over: a new epoch
        in the first half, the second free.

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
        self.older = None
        self._free(1)
        self.current = Epoch(self.current.number, 0)
        self.restart()
        self.sync()

    def records(self) -> list[tuple[str, int, bytes]]:
        """The records a replay applies now (block id, offset, data), in order (rule 1);
        the newest header's epoch becomes the current one's number."""
        epochs = sorted((number, half) for half in (0, 1)
                        if (number := _valid_header(os.pread(
                            self.fd, _HEADER.size + _CRC.size, _start(half)))) is not None)
        out: list[tuple[str, int, bytes]] = []
        for number, half in epochs:
            out += self._half_records(number, half)
        if epochs:
            self.current = Epoch(epochs[-1][0], epochs[-1][1])
        return out

    def _half_records(self, number: int, half: int) -> list[tuple[str, int, bytes]]:
        out: list[tuple[str, int, bytes]] = []
        pos = _start(half) + HEADER_SIZE
        limit = min(os.fstat(self.fd).st_size, _start(half) + HEADER_SIZE + JOURNAL_MAX)
        while pos + _RECORD.size <= limit:
            head = os.pread(self.fd, _RECORD.size, pos)
            magic, epoch, id_len, offset, length = _RECORD.unpack(head)
            if magic != RECORD or epoch != number:
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
        """Whether the current epoch holds records (its end then has rules to keep: rule 3)."""
        return self.end > _start(self.current.half) + HEADER_SIZE

    def fits(self, count: int, nbytes: int) -> bool:
        """Whether `count` records holding `nbytes` of data fit in the current epoch."""
        return (self.end + nbytes + count * RECORD_OVERHEAD
                <= _start(self.current.half) + HEADER_SIZE + JOURNAL_MAX)

    def grows(self, count: int, nbytes: int) -> bool:
        """Whether appending `count` records of `nbytes` would grow the file (by GROW)."""
        return self.end + nbytes + count * RECORD_OVERHEAD > self.written[self.current.half]

    def append(self, records: list[tuple[str, int, bytes]]) -> None:
        """Write records (block id, offset, data) into the page cache; `sync` makes them
        durable. On a failure (a full disk) nothing counts: the next append overwrites it."""
        parts: list[bytes] = []
        number = self.current.number
        for block_id, offset, data in records:
            bid = block_id.encode("ascii")
            head = _RECORD.pack(RECORD, number, len(bid), offset, len(data))
            crc = zlib.crc32(data, zlib.crc32(bid, zlib.crc32(head)))
            parts += (head, bid, data, _CRC.pack(crc))
        blob = b"".join(parts)
        half = self.current.half
        if self.end + len(blob) > self.written[half]:
            start = _start(half)
            grown = start + min((self.end - start + len(blob) + GROW) // GROW * GROW,
                                HEADER_SIZE + JOURNAL_MAX)
            pwrite_all(self.fd, bytes(grown - self.written[half]), self.written[half])
            self.written[half] = grown
        pwrite_all(self.fd, blob, self.end)
        self.end += len(blob)
        self.current.live.update(block_id for block_id, _, _ in records)

    def let_go(self, block_id: str) -> None:
        """A dirty block was dropped: no epoch holds it any more (rule 2), and the drop must
        be durable before an epoch that held it may end (rule 3: else a crash would bring the
        block back without the bytes only its records held)."""
        for epoch in (self.current, self.older):
            if epoch is not None and block_id in epoch.live:
                epoch.live.discard(block_id)
                epoch.dropped.add(block_id)
                self.drops += 1

    def hold_again(self, block_id: str) -> None:
        """A rollback brought back a block dropped this epoch: its fsynced bytes may be in
        the journal only, so it is held again."""
        for epoch in (self.current, self.older):
            if epoch is not None and block_id in epoch.dropped:
                epoch.live.add(block_id)

    def restart(self) -> None:
        """End the current epoch: a new one in the same half, whose records stop counting once
        the new header is on the disk (the next `sync`). See rule 3 for when this is allowed."""
        self._begin(Epoch(self._next_number(), self.current.half))

    def switch(self) -> None:
        """Start a new epoch in the other half, which must be free (no `older` epoch); the
        current one becomes `older`, to be retired (`retire_older`) once rule 3 allows."""
        assert self.older is None
        self.older = self.current
        self._begin(Epoch(self._next_number(), 1 - self.current.half))

    def retire_older(self) -> None:
        """End the older epoch (rule 3 allowing): its header is zeroed, and the next `sync`
        makes its records stop counting."""
        assert self.older is not None
        self._free(self.older.half)
        self.older = None

    def sync(self) -> None:
        """fdatasync the journal (blocking): what was written before it is durable."""
        os.fdatasync(self.fd)

    def _next_number(self) -> int:
        return max(self.current.number, self.older.number if self.older else 0) + 1

    def _begin(self, epoch: Epoch) -> None:
        header = _HEADER.pack(MAGIC, epoch.number)
        page = (header + _CRC.pack(zlib.crc32(header))).ljust(HEADER_SIZE, b"\0")
        start = _start(epoch.half)
        pwrite_all(self.fd, page, start)
        self.written[epoch.half] = max(self.written[epoch.half], start + HEADER_SIZE)
        self.current = epoch
        self.end = _start(epoch.half) + HEADER_SIZE

    def _free(self, half: int) -> None:
        if self.written[half] > _start(half):
            pwrite_all(self.fd, bytes(HEADER_SIZE), _start(half))


def _start(half: int) -> int:
    return half * (HEADER_SIZE + JOURNAL_MAX)


def _written(fd: int, half: int, size: int) -> int:
    """Where the bytes written at the start of `half` end (the rest of it is a hole, or
    past the end of the file of `size` bytes)."""
    start = _start(half)
    if size <= start:
        return start
    try:
        hole = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError:
        hole = size
    return min(hole, size, start + HEADER_SIZE + JOURNAL_MAX)


def _valid_header(header: bytes) -> int | None:
    if len(header) < _HEADER.size + _CRC.size:
        return None
    magic, epoch = _HEADER.unpack_from(header)
    (crc,) = _CRC.unpack_from(header, _HEADER.size)
    if magic != MAGIC or zlib.crc32(header[: _HEADER.size]) != crc:
        return None
    return int(epoch)
