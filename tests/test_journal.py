"""The data journal (wsfs/blocks/journal.py): what a small fsync(2) acknowledged survives a
crash of the machine, which loses every write the kernel had not yet put on the disk.

A machine crash is simulated after SIGKILL of the daemon (or after dropping a BlockCache) by
putting back, in the dirty blocks' files, what the disk held before the writes: the bytes
each journal record covers are zeroed (or the whole file deleted, for a block created since
the last sync). Then the mount, or `recover`, must replay the journal. Each test also checks
that the journal did the work (records exist), so none passes with the journal bypassed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import Workspace, lose_unsynced_writes

from wsfs.blocks import BlockCache
from wsfs.blocks import fsync as fsync_module
from wsfs.blocks import journal as journal_module
from wsfs.blocks.journal import FSYNC_MAX, Journal
from wsfs.cachedir import CacheDir
from wsfs.store import LocalStore

BS = 1 << 20


class NoMetadata:
    """The metadata's sync (blocks/fsync.py's MetadataSync), for a block cache without any."""

    async def durable_metadata(self) -> None:
        pass


NO_METADATA = NoMetadata()


def open_blocks(cache: Path, store: Path,
                wanted: Callable[[str], bool] = lambda _: True) -> BlockCache:
    """A block cache over `cache` that replayed its journal into the `wanted` blocks."""
    blocks = BlockCache(cache, LocalStore(store), block_size=BS, cache_size=1 << 26,
                        dirty_limit=1 << 26, limiter=trio.CapacityLimiter(4))
    blocks.recover(wanted)
    return blocks


@pytest.mark.layers
def test_replay_restores_what_small_fsyncs_acknowledged(tmp_path: Path) -> None:
    cache, store = tmp_path / "cache", tmp_path / "store"

    async def main() -> tuple[str, str, bytes, bytes]:
        blocks = open_blocks(cache, store)
        a = blocks.create(b"a" * 10_000)  # a new block: all of it is unsynced
        b_id = blocks.create()
        blocks.write(b_id, 0, b"\0" * BS)
        await blocks.fsync([b_id], metadata=NO_METADATA)  # big: its file is synced, not journaled
        blocks.write(b_id, 4096, b"x" * 4096)
        blocks.write(b_id, 900_000, b"y" * 100)
        blocks.write(a, 5, b"zz")
        await blocks.fsync([a, b_id], metadata=NO_METADATA)
        expected_a = b"a" * 5 + b"zz" + b"a" * (10_000 - 7)
        expected_b = bytearray(BS)
        expected_b[4096:8192] = b"x" * 4096
        expected_b[900_000:900_100] = b"y" * 100
        blocks.close()
        return a, b_id, expected_a, bytes(expected_b)

    a, b_id, expected_a, expected_b = trio.run(main)
    records = lose_unsynced_writes(cache, delete_new=frozenset({a}))
    assert {r[0] for r in records} == {a, b_id}
    assert sum(len(r[2]) for r in records) == 10_000 + 4096 + 100  # the ranges, not blocks
    assert not (CacheDir(cache).dirty / a).exists()

    blocks = open_blocks(cache, store)
    try:
        assert (CacheDir(cache).dirty / a).read_bytes() == expected_a
        assert (CacheDir(cache).dirty / b_id).read_bytes() == expected_b
        assert Journal(CacheDir(cache).journal).records() == []  # a new epoch: replayed once
    finally:
        blocks.close()


@pytest.mark.layers
def test_a_block_synced_through_its_file_is_never_reverted_by_an_older_record(
        tmp_path: Path) -> None:
    """Rule 2: once journaled, a block synced through its own file (a big fsync) ends the
    epoch, so the older record can no longer put the older bytes back."""
    cache, store = tmp_path / "cache", tmp_path / "store"

    async def main() -> str:
        blocks = open_blocks(cache, store)
        block = blocks.create()
        blocks.write(block, 0, b"old!")
        await blocks.fsync([block], metadata=NO_METADATA)
        assert blocks.journal.live == {block}
        blocks.write(block, 0, b"new!" + b"n" * (FSYNC_MAX + 1))
        await blocks.fsync([block], metadata=NO_METADATA)  # too big for the journal
        assert blocks.journal.live == set()
        blocks.close()
        return block

    block = trio.run(main)
    assert lose_unsynced_writes(cache) == []
    blocks = open_blocks(cache, store)
    try:
        assert (CacheDir(cache).dirty / block).read_bytes()[:4] == b"new!"
    finally:
        blocks.close()


@pytest.mark.layers
def test_a_torn_record_ends_the_replay(tmp_path: Path) -> None:
    """A record cut short by the crash was never acknowledged, nor anything after it."""
    cache, store = tmp_path / "cache", tmp_path / "store"

    async def main() -> tuple[str, int]:
        blocks = open_blocks(cache, store)
        block = blocks.create()
        blocks.write(block, 0, b"1" * 100)
        await blocks.fsync([block], metadata=NO_METADATA)
        blocks.write(block, 100, b"2" * 100)
        await blocks.fsync([block], metadata=NO_METADATA)
        end = blocks.journal.end
        blocks.close()
        return block, end

    block, end = trio.run(main)
    with open(CacheDir(cache).journal, "r+b") as f:  # the last record's checksum no longer matches
        f.seek(end - 2)
        f.write(b"\xff")
    records = lose_unsynced_writes(cache)
    assert [(r[1], len(r[2])) for r in records] == [(0, 100)]
    with open(CacheDir(cache).dirty / block, "r+b") as f:  # the torn record's write is lost too
        f.seek(100)
        f.write(bytes(100))
    blocks = open_blocks(cache, store)
    try:
        assert (CacheDir(cache).dirty / block).read_bytes()[:200] == b"1" * 100 + bytes(100)
    finally:
        blocks.close()


@pytest.mark.layers
def test_an_epoch_ends_once_no_block_it_holds_is_dirty_after_the_metadata_sync(
        tmp_path: Path) -> None:
    """Rule 3: the journal starts over when its blocks are gone, and only after the metadata
    that dropped them is durable (else a crash would bring back a block whose bytes the
    journal no longer holds)."""
    cache, store = tmp_path / "cache", tmp_path / "store"
    order: list[str] = []

    async def main() -> None:
        blocks = open_blocks(cache, store)

        class MetadataSync:
            async def durable_metadata(self) -> None:
                order.append(f"metadata sync, epoch {blocks.journal.epoch}")

        metadata = MetadataSync()
        first = blocks.create()
        blocks.write(first, 0, b"a" * 100)
        await blocks.fsync([first], metadata=metadata)
        epoch = blocks.journal.epoch
        blocks.discard(first)  # the file was deleted
        second = blocks.create()
        blocks.write(second, 0, b"b" * 100)
        await blocks.fsync([second], metadata=metadata)
        assert order == [f"metadata sync, epoch {epoch}"]
        assert blocks.journal.epoch == epoch + 1
        assert blocks.journal.live == {second}
        blocks.close()

    trio.run(main)
    assert {r[0] for r in lose_unsynced_writes(cache)} != set()
    assert len(Journal(CacheDir(cache).journal).records()) == 1


@pytest.mark.timeout(240)
def test_fsynced_random_writes_survive_a_machine_crash(ws: Workspace) -> None:
    """Through a mount: an SQLite-like writer (4 KiB writes at random offsets of an uploaded
    file and of a new one, fsync every few writes), SIGKILL, the writes the disk had not
    got are lost, remount on the same cache dir: every fsynced byte is there."""
    mnt = ws.mount(flush_delay=3600)
    old = bytearray(os.urandom(3 * BS))
    (mnt / "old").write_bytes(old)
    ws.wsfs("sync", str(mnt))  # uploaded: writes to it copy its blocks first
    new = bytearray()
    rng = random.Random(7)
    fd_old = os.open(mnt / "old", os.O_WRONLY)
    fd_new = os.open(mnt / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(40):
            data = os.urandom(4096)
            off = rng.randrange(0, 3 * BS - 4096)
            os.pwrite(fd_old, data, off)
            old[off : off + 4096] = data
            os.write(fd_new, data)
            new += data
            if i % 4 == 3:
                os.fsync(fd_old)
                os.fsync(fd_new)
        ws.kill()
    finally:
        for fd in (fd_old, fd_new):
            with contextlib.suppress(OSError):
                os.close(fd)
    records = lose_unsynced_writes(ws.cache_dir)
    assert len(records) >= 20  # the fsyncs went through the journal
    mnt = ws.mount(flush_delay=3600)
    assert (mnt / "old").read_bytes() == bytes(old)
    assert (mnt / "new").read_bytes() == bytes(new)
    ws.unmount()
    result = ws.wsfs("fsck", ws.store_url, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.layers
def test_replay_leaves_out_blocks_no_longer_awaiting_upload(tmp_path: Path) -> None:
    """A block uploaded (or dropped) before the crash is not written again, nor its file
    made anew: the store holds it, and the metadata no longer waits for it."""
    cache, store = tmp_path / "cache", tmp_path / "store"

    async def main() -> tuple[str, str]:
        blocks = open_blocks(cache, store)
        kept, gone = blocks.create(), blocks.create()
        blocks.write(kept, 0, b"k" * 100)
        blocks.write(gone, 0, b"g" * 100)
        await blocks.fsync([kept, gone], metadata=NO_METADATA)
        blocks.close()
        return kept, gone

    kept, gone = trio.run(main)
    assert {r[0] for r in lose_unsynced_writes(cache, delete_new=frozenset({gone}))} == {
        kept, gone}
    blocks = open_blocks(cache, store, wanted=lambda block_id: block_id == kept)
    try:
        assert blocks.dirty_count == 1
        assert (CacheDir(cache).dirty / kept).read_bytes() == b"k" * 100
        assert not (CacheDir(cache).dirty / gone).exists()
    finally:
        blocks.close()


@pytest.mark.layers
def test_a_full_journal_or_disk_falls_back_to_syncing_the_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal that is full ends its epoch at the next fsync of a block it holds; one that
    cannot be written (a full disk) leaves the fsync to the blocks' files. Either way what
    the fsyncs acknowledged is there after the crash."""
    cache, store = tmp_path / "cache", tmp_path / "store"
    monkeypatch.setattr(journal_module, "JOURNAL_MAX", 64 << 10)

    async def main() -> tuple[str, str, bytes]:
        blocks = open_blocks(cache, store)
        block = blocks.create()
        content = bytearray(BS)
        first_epoch = blocks.journal.epoch
        for i in range(40):  # 40 x 4 KiB > 64 KiB of journal
            data = os.urandom(4096)
            blocks.write(block, i * 8192, data)
            content[i * 8192 : i * 8192 + 4096] = data
            await blocks.fsync([block], metadata=NO_METADATA)
        assert blocks.journal.epoch > first_epoch  # the full journal ended its epoch

        def disk_full(records: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        nearly_full = blocks.create()  # the journal may not grow into the reserve
        blocks.write(nearly_full, 0, b"n" * 100)
        journal = blocks.journal
        journal.written[journal.current.half] = journal.end  # the next record needs more file
        with monkeypatch.context() as m:
            m.setattr(blocks.space, "disk_free", lambda: blocks.reserve)
            await blocks.fsync([nearly_full], metadata=NO_METADATA)
        assert nearly_full not in blocks.journal.live
        other = blocks.create()
        monkeypatch.setattr(blocks.journal, "append", disk_full)
        blocks.write(other, 0, b"o" * 100)
        await blocks.fsync([other], metadata=NO_METADATA)  # through its file: nothing to replay
        assert other not in blocks.journal.live
        blocks.close()
        return block, other, bytes(content[: 39 * 8192 + 4096])  # the file's length

    block, other, content = trio.run(main)
    assert other not in {r[0] for r in lose_unsynced_writes(cache)}
    blocks = open_blocks(cache, store)
    try:
        assert (CacheDir(cache).dirty / block).read_bytes() == content
        assert (CacheDir(cache).dirty / other).read_bytes() == b"o" * 100
    finally:
        blocks.close()


@pytest.mark.layers
def test_a_block_taken_back_after_a_rollback_stays_in_the_journal(tmp_path: Path) -> None:
    """A journaled block (its fsynced bytes in the journal only) dropped by a change that is
    then rolled back comes back as a dirty block: the journal must hold it again, or a later
    end of the epoch would throw away the only durable copy of those bytes."""
    async def main() -> None:
        blocks = open_blocks(tmp_path / "cache", tmp_path / "store")
        block = blocks.create()
        blocks.write(block, 0, b"acknowledged")
        await blocks.fsync([block], metadata=NO_METADATA)
        assert blocks.journal.live == {block}
        blocks.discard(block)  # a change drops it...
        assert blocks.journal.live == set()
        blocks.after_rollback(lambda b: b == block)  # ...and is rolled back
        assert blocks.journal.live == {block} and blocks.is_writable(block)
        blocks.close()

    trio.run(main)


@pytest.mark.layers
def test_small_journal_fsyncs_sync_on_the_trio_thread_while_the_disk_is_fast(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-off to a worker thread and back costs more than the fdatasync(2) of a few
    journaled pages on a fast disk: those run on the trio thread, with the metadata's sync
    when the caller says it is small too. Bigger ones go to worker threads, and so do small
    ones while recent syncs were slow (a busy disk would hold every other request), until
    fast syncs bring their moving average back down."""
    synced: list[tuple[str, bool]] = []  # (file, on the trio thread)
    disk_time = [0.0]  # how long each fdatasync takes (none syncs: only where they run counts)

    def recorded(fd: int) -> None:
        time.sleep(disk_time[0])
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")),
                       threading.current_thread() is threading.main_thread()))

    wal = tmp_path / "wal"
    wal.write_bytes(b"w")

    def metadata_sync() -> None:
        fd = os.open(wal, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    async def main() -> list[list[tuple[str, bool]]]:
        blocks = open_blocks(tmp_path / "cache", tmp_path / "store")
        block = blocks.create()
        monkeypatch.setattr(os, "fdatasync", recorded)
        rounds: list[list[tuple[str, bool]]] = []

        async def fsync(also_small: bool) -> list[tuple[str, bool]]:
            blocks.write(block, 4096 * (len(rounds) % 200), b"x" * 4096)
            await blocks.fsync([block], metadata_sync, also_small=also_small,
                               metadata=NO_METADATA)
            rounds.append(sorted(synced))
            synced.clear()
            return rounds[-1]

        await fsync(also_small=True)
        await fsync(also_small=False)  # a big metadata sync: both in workers, at once
        disk_time[0] = fsync_module.INLINE_BELOW * 20  # the disk turns slow: ...
        await fsync(also_small=True)  # ... the next sync runs inline, and is slow
        await fsync(also_small=True)  # so small ones go to workers
        disk_time[0] = 0.0
        for _ in range(50):  # fast syncs in workers lower the average: inline again
            if await fsync(also_small=True) == rounds[0]:
                break
        blocks.close()
        return rounds

    inline = [("journal", True), ("wal", True)]
    workers = [("journal", False), ("wal", False)]
    rounds = trio.run(main)
    assert rounds[:4] == [inline, workers, inline, workers]
    assert rounds[-1] == inline and all(r == workers for r in rounds[4:-1])


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files fdatasync(2) syncs from now on."""
    synced: list[str] = []
    real = os.fdatasync

    def recorded(fd: int) -> None:
        real(fd)
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fdatasync", recorded)
    return synced


@pytest.mark.layers
@pytest.mark.parametrize("retired", [False, True])
def test_a_full_half_hands_over_to_the_other_without_syncing_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retired: bool) -> None:
    """An fsync that finds the journal's half full starts the next epoch in the other half
    and syncs only the journal (syncing every block the full half held took it 50-250 ms);
    the full half is retired in the background (`BlockCache.maintain`) by syncing those
    blocks. A crash before the retirement replays both halves, older first (a range written
    again in the newer keeps its newer bytes); after it, the newer half alone."""
    cache, store = tmp_path / "cache", tmp_path / "store"
    monkeypatch.setattr(journal_module, "JOURNAL_MAX", 64 << 10)  # ~14 fsyncs of 4 KiB
    synced = record_syncs(monkeypatch)

    async def main() -> tuple[list[str], dict[str, bytes]]:
        blocks = open_blocks(cache, store)
        a, b = blocks.create(), blocks.create()
        content = {a: bytearray(BS), b: bytearray(BS)}
        journal = blocks.journal
        first = journal.current
        i = 0
        while journal.current is first:  # fill the first half: a and b take turns
            block = (a, b)[i % 2]
            data = os.urandom(4096)
            offset = (i // 2) * 4096 % (BS // 2)
            blocks.write(block, offset, data)
            content[block][offset : offset + 4096] = data
            synced.clear()
            await blocks.fsync([block], metadata=NO_METADATA)
            i += 1
        handed_over = list(synced)  # the fsync that found the half full
        assert journal.older is first and journal.current.half != first.half
        again = b"n" * 4096  # the newer half writes a range the older one holds again
        blocks.write(a, 0, again)
        content[a][0:4096] = again
        await blocks.fsync([a], metadata=NO_METADATA)
        if retired:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocks.maintain)
                while journal.older is not None:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        else:
            assert journal.older is first
        blocks.close()
        return handed_over, {k: bytes(v.rstrip(b"\0")) for k, v in content.items()}

    handed_over, expected = trio.run(main)
    assert handed_over == ["journal"]  # no block's file
    records = lose_unsynced_writes(cache)
    # the newer half holds two records: the fsync that found the other full, and `again`
    assert len(records) == 2 if retired else len(records) > 2
    blocks = open_blocks(cache, store)
    try:
        for block, data in expected.items():
            assert (CacheDir(cache).dirty / block).read_bytes() == data, block
    finally:
        blocks.close()


@pytest.mark.layers
def test_a_block_the_older_half_holds_synced_through_its_file_retires_that_half_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 2 for the older half: a big fsync syncs a block it holds through the block's
    own file only after retiring it, so its older record cannot put older bytes back."""
    cache, store = tmp_path / "cache", tmp_path / "store"
    monkeypatch.setattr(journal_module, "JOURNAL_MAX", 64 << 10)

    async def main() -> str:
        blocks = open_blocks(cache, store)
        block, filler = blocks.create(), blocks.create()
        blocks.write(block, 0, b"old!")
        await blocks.fsync([block], metadata=NO_METADATA)
        journal = blocks.journal
        first = journal.current
        while journal.current is first:
            blocks.write(filler, 0, os.urandom(4096))
            await blocks.fsync([filler], metadata=NO_METADATA)
        assert journal.older is first and block in first.live
        blocks.write(block, 0, b"new!" + b"n" * (FSYNC_MAX + 1))
        await blocks.fsync([block], metadata=NO_METADATA)  # too big for the journal
        assert journal.older is None
        blocks.close()
        return block

    block = trio.run(main)
    assert block not in {r[0] for r in lose_unsynced_writes(cache)}
    blocks = open_blocks(cache, store)
    try:
        assert (CacheDir(cache).dirty / block).read_bytes()[:4] == b"new!"
    finally:
        blocks.close()


@pytest.mark.layers
def test_a_failed_retirement_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A block's sync failing (EIO) during the background retirement of a full half is
    logged and retried, not fatal to the block cache's upkeep."""
    monkeypatch.setattr(journal_module, "JOURNAL_MAX", 64 << 10)
    monkeypatch.setattr(fsync_module, "RETIRE_RETRY", 0.05)
    failing: list[str] = []  # the block whose next sync fails
    real = os.fdatasync

    def fail_once(fd: int) -> None:
        if failing and os.readlink(f"/proc/self/fd/{fd}").endswith(failing[0]):
            failing.clear()
            raise OSError(errno.EIO, "injected")
        real(fd)

    async def main() -> None:
        blocks = open_blocks(tmp_path / "cache", tmp_path / "store")
        block = blocks.create()
        journal = blocks.journal
        first = journal.current
        while journal.current is first:
            blocks.write(block, 0, os.urandom(4096))
            await blocks.fsync([block], metadata=NO_METADATA)
        failing.append(block)
        monkeypatch.setattr(os, "fdatasync", fail_once)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocks.maintain)
            while journal.older is not None:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert not failing  # it failed once, and the retry went through
        blocks.close()

    trio.run(main)
    assert "cannot retire the full half of the data journal" in caplog.text
