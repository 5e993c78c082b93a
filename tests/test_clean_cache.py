"""Clean copies of deleted blocks: their entries leave the clean cache in the background, in
batches (deleting them one transaction at a time in the FUSE thread made removing an uploaded
tree ~25 % slower than removing one not yet uploaded), and never take a kept file with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from conftest import Workspace, wait_for

from wsfs.blocks import object_key
from wsfs.blocks import pack as packs
from wsfs.blocks.clean import CleanCache
from wsfs.cachedir import CacheDir
from wsfs.store import LocalStore

FILE_SIZE = 200_000  # above diskcache's inline limit: each clean copy is a file of its own


def clean_copy_files(cache_dir: Path) -> int:
    """How many clean copies the clean cache holds as files of their own (os.walk: diskcache
    removes a directory it emptied while this walks, which made rglob fail)."""
    return sum(name.endswith(".val") for _, _, names in os.walk(CacheDir(cache_dir).clean)
               for name in names)


def open_clean(tmp_path: Path) -> CleanCache:
    return CleanCache(tmp_path / "clean", LocalStore(tmp_path / "store"), block_size=1 << 20,
                      size_limit=1 << 30, limiter=trio.CapacityLimiter(1), read_timeout=5)


@pytest.mark.timeout(240)
def test_deleted_files_leave_the_clean_cache(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=600)  # blocks go up only at `wsfs sync` and the unmount
    keep, gone = mnt / "keep", mnt / "gone"
    keep.mkdir()
    gone.mkdir()
    contents = {f"f{i:03d}": os.urandom(FILE_SIZE) for i in range(20)}
    for name, data in contents.items():
        (keep / name).write_bytes(data)
        (gone / name).write_bytes(data[::-1])
    ws.wsfs("sync", str(mnt))  # uploaded: each block's file became its clean copy
    wait_for("40 clean copies", lambda: clean_copy_files(ws.cache_dir) >= 40, timeout=20)

    for name in contents:
        (gone / name).unlink()
    wait_for("the deleted files' clean copies to go",
             lambda: clean_copy_files(ws.cache_dir) == 20, timeout=20)
    for name, data in contents.items():
        assert (keep / name).read_bytes() == data

    mnt = ws.remount(wipe_cache=False)  # the kept files' copies serve the next mount
    assert clean_copy_files(ws.cache_dir) == 20
    for name, data in contents.items():
        assert (mnt / "keep" / name).read_bytes() == data
    assert sorted(os.listdir(mnt / "gone")) == []


@pytest.mark.layers
def test_discarded_copies_pending_at_close_are_deleted(tmp_path: Path) -> None:
    """A copy discarded just before the unmount is deleted by close, not left for good."""
    clean = open_clean(tmp_path)
    clean.keep({"a" * 32: b"x" * FILE_SIZE, "b" * 32: b"y" * FILE_SIZE})
    clean.discard("a" * 32)
    assert clean.read("b" * 32, 0, 4) == b"yyyy"
    clean.close()
    again = open_clean(tmp_path)
    try:
        assert again.read("a" * 32, 0, 4) is None
        assert again.read("b" * 32, 0, 4) == b"yyyy"
    finally:
        again.close()


@pytest.mark.layers
def test_a_packs_other_members_are_held_in_memory_for_their_reader(tmp_path: Path) -> None:
    """A pack's download hands its other members to the readers that ask next (readahead:
    a sequential reader wants them soon) from memory, not from the copy just written; a
    discarded block is not held."""
    clean = open_clean(tmp_path)
    members = [(f"{i}" * 32, os.urandom(FILE_SIZE)) for i in range(3)]
    blob, csums = packs.build(members)
    clean.store.put(object_key("p" * 32), blob)
    (first, data0), (second, data1), (third, _) = members
    try:
        got = trio.run(clean.download, first, csums[first], "p" * 32)
        assert got == data0
        clean.discard(third)
        clean.db.clear()  # the kept copies are gone: only what is held in memory answers
        assert clean.read(second, 0, FILE_SIZE) == data1
        assert clean.read(third, 0, 4) is None
    finally:
        clean.close()


@pytest.mark.layers
@pytest.mark.parametrize("deletable", [True, False])
def test_the_copy_of_a_block_written_again_is_never_served(tmp_path: Path,
                                                           deletable: bool) -> None:
    """A block whose checksum's commit was lost (rolled back on a full disk, or in a crash)
    is dirty again under the same id, and may be written: the copy its first upload kept
    holds the older bytes. It must not be served, whether or not its deletion succeeds (a
    full disk), until the next upload keeps a copy of the new bytes."""
    cache = open_clean(tmp_path)
    old, new = b"a" * 300_000, b"b" * 300_000
    cache.keep({"x": old})
    cache.forget("x")
    if deletable:
        cache.delete(cache.take_discarded())
    else:  # the deletion fails: the entry stays on disk
        cache.take_discarded()
    assert "x" not in cache and cache.read("x", 0, 10) is None and cache.open("x") is None
    cache.keep({"x": new})
    assert cache.read("x", 0, 10) == new[:10]
    cache.close()
