"""The pool of empty dirty-block files: the files of dropped blocks are emptied and renamed
into it instead of deleted (creating a file costs ~150-200 us of CPU on ext4, a recycle ~10 us),
and a recycled file never lends its old bytes to the block that reuses it. Through a real mount.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Workspace, wait_for

from wsfs.cachedir import CacheDir


def dirty_files(cache_dir: Path) -> dict[int, int]:
    """st_ino -> size of every file in the cache's dirty dir."""
    found = {}
    for entry in os.scandir(CacheDir(cache_dir).dirty):
        try:
            st = entry.stat()
        except FileNotFoundError:  # deleted while we looked
            continue
        found[st.st_ino] = st.st_size
    return found


def write_files(root: Path, names: list[str], content: bytes) -> None:
    for name in names:
        (root / name).write_bytes(content)


@pytest.mark.timeout(240)
def test_dropped_block_files_are_recycled_and_lend_no_stale_bytes(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=600)  # blocks go up only at `wsfs sync` and the unmount
    first = [f"a{i:04d}" for i in range(300)]  # more than the pool's 256 open files
    write_files(mnt, first, b"A" * 3000)
    old = {ino for ino, size in dirty_files(ws.cache_dir).items() if size == 3000}
    assert len(old) >= 290, "the first files should be dirty blocks now"
    ws.wsfs("sync", str(mnt))  # uploaded: their dirty files are dropped

    def recycled() -> set[int]:
        now = dirty_files(ws.cache_dir)
        return {ino for ino in old if now.get(ino) == 0}

    # Deleted, they would be gone: no new file is created while the pool is this full.
    wait_for("nine in ten of the files to be recycled",
             lambda: len(recycled()) >= len(old) * 9 // 10, timeout=20)

    # Reuse them: more new files than the pool holds open, so spare ones are reopened too.
    second = [f"b{i:04d}" for i in range(600)]
    write_files(mnt, second, b"B" * 100)
    for name in second:
        os.truncate(mnt / name, 3000)  # the tail must read as zeros, never as old "A"s
    reused = {ino for ino, size in dirty_files(ws.cache_dir).items() if size == 100} & old
    assert reused, "no recycled file was reused by a new block"

    want_b = b"B" * 100 + b"\0" * 2900
    for name in first:
        assert (mnt / name).read_bytes() == b"A" * 3000, name
    for name in second:
        assert (mnt / name).read_bytes() == want_b, name

    ws.remount(flush_delay=600)  # a fresh cache: every byte comes from what was uploaded
    for name in first:
        assert (mnt / name).read_bytes() == b"A" * 3000, name
    for name in second:
        assert (mnt / name).read_bytes() == want_b, name
