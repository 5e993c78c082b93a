"""The metadata caches (inode rows, xattr owners, parents, finished listings) never answer
what SQLite no longer holds: after a rollback of one handler, after SQLite rolls the whole
group back by itself, and after a directory changes between two listings. Metadata and the
Operations class are called directly, without the kernel, except for the listing test."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import Workspace

from wsfs.blocks import BlockCache
from wsfs.fs import Operations
from wsfs.meta import Metadata
from wsfs.store import LocalStore


def fresh_meta(tmp_path: Path) -> Metadata:
    meta = Metadata(tmp_path / "meta.db")
    meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, time.time_ns(), nlink=2, ino=1)
    meta.flush()
    return meta


def add_file(meta: Metadata, name: bytes) -> int:
    node = meta.create_inode(stat.S_IFREG | 0o644, 0, 0, time.time_ns())
    meta.add_entry(1, name, node.id)
    return node.id


@pytest.mark.layers
def test_rollback_forgets_a_cached_change(tmp_path: Path) -> None:
    meta = fresh_meta(tmp_path)
    ino = add_file(meta, b"f")
    meta.flush()
    meta.begin()
    node = meta.get_inode(ino)
    assert node is not None
    node.size, node.nlink = 12345, 7
    meta.save_inode(node)
    assert meta.get_inode(ino) == node  # written through
    meta.rollback()
    back = meta.get_inode(ino)
    assert back is not None and (back.size, back.nlink) == (0, 1)


@pytest.mark.layers
def test_rolled_back_delete_keeps_inode_and_xattrs(tmp_path: Path) -> None:
    meta = fresh_meta(tmp_path)
    ino = add_file(meta, b"f")
    meta.set_xattr(ino, b"user.k", b"v")
    meta.flush()
    meta.begin()
    meta.delete_inodes([ino])
    assert meta.get_inode(ino) is None and meta.get_xattr(ino, b"user.k") is None
    meta.rollback()
    assert meta.get_inode(ino) is not None
    assert meta.get_xattr(ino, b"user.k") == b"v"
    assert meta.list_xattrs(ino) == [b"user.k"]


@pytest.mark.layers
def test_group_rolled_back_by_sqlite_resets_the_caches(tmp_path: Path) -> None:
    """A full disk makes SQLite roll the whole open transaction back by itself: every later
    read must come from the database again, not from what the cache saw written."""
    meta = fresh_meta(tmp_path)
    ino = add_file(meta, b"f")
    meta.flush()
    node = meta.get_inode(ino)
    assert node is not None
    node.mtime_ns = 42
    meta.save_inode(node)
    meta.delete_inodes([add_file(meta, b"g")])
    meta.conn.rollback()  # what SQLITE_FULL does to the group transaction
    again = meta.get_inode(ino)
    assert again is not None and again.mtime_ns != 42
    assert meta.lookup(1, b"g") is None


@pytest.mark.layers
def test_block_count_cache_follows_block_changes_and_rollbacks(tmp_path: Path) -> None:
    """st_blocks comes from a cached count: every change of the block map and every rollback
    (of one handler, or of the whole group by SQLite) must be seen."""
    meta = fresh_meta(tmp_path)
    ino = add_file(meta, b"f")
    assert meta.block_count(ino) == 0  # known from the create, no query
    meta.set_block(ino, 0, "b0")
    assert meta.block_count(ino) == 1
    meta.flush()
    meta.begin()
    meta.set_block(ino, 1, "b1")
    assert meta.block_count(ino) == 2
    meta.rollback()
    assert meta.block_count(ino) == 1
    meta.set_block(ino, 2, "b2")
    meta.set_block(ino, 2, "b2bis")  # a replacement counts once
    assert meta.block_count(ino) == 2
    meta.conn.rollback()  # SQLite drops the whole group by itself (a full disk)
    assert meta.block_count(ino) == 1
    meta.set_block(ino, 3, "b3")
    found = meta.lookup_inode(1, b"f")
    assert found is not None and found[1] == 2
    assert meta.remove_blocks_from(ino, 1) and meta.block_count(ino) == 1
    meta.remove_block(ino, 0)
    assert meta.block_count(ino) == 0


@pytest.mark.layers
def test_parent_cache_follows_a_rename(tmp_path: Path) -> None:
    meta = fresh_meta(tmp_path)
    a = meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, 1, nlink=2)
    b = meta.create_inode(stat.S_IFDIR | 0o755, 0, 0, 1, nlink=2)
    meta.add_entry(1, b"a", a.id)
    meta.add_entry(1, b"b", b.id)
    meta.add_entry(a.id, b"sub", (sub := meta.create_inode(stat.S_IFDIR, 0, 0, 1, nlink=2)).id)
    assert meta.parent_of(sub.id) == a.id
    meta.move_entry(a.id, b"sub", b.id, b"sub")
    assert meta.parent_of(sub.id) == b.id


class Ctx:
    uid = os.getuid()
    gid = os.getgid()
    pid = os.getpid()
    umask = 0o022


@pytest.mark.ops
def test_create_of_an_existing_name_is_eexist_and_leaves_nothing(tmp_path: Path) -> None:
    """create finds an existing name through the unique index, after inserting the inode:
    the inode must go again, and the inode cache must not keep it."""
    meta = fresh_meta(tmp_path)
    blocks = BlockCache(tmp_path / "cache", LocalStore(tmp_path / "store"), block_size=1 << 20,
                        cache_size=1 << 24, dirty_limit=1 << 24,
                        limiter=trio.CapacityLimiter(1))
    ops = Operations(meta, blocks)
    ctx: pyfuse3.RequestContext = Ctx()  # type: ignore[assignment]

    async def main() -> None:
        fi, attr = await ops.create(pyfuse3.InodeT(1), pyfuse3.FileNameT(b"x"),
                                    pyfuse3.ModeT(0o100644), os.O_WRONLY, ctx)
        inodes = meta.counts()[0]
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.create(pyfuse3.InodeT(1), pyfuse3.FileNameT(b"x"),
                             pyfuse3.ModeT(0o100644), os.O_WRONLY, ctx)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.mkdir(pyfuse3.InodeT(1), pyfuse3.FileNameT(b"x"), pyfuse3.ModeT(0o755), ctx)
        assert e.value.errno == errno.EEXIST
        assert meta.counts()[0] == inodes
        assert meta.get_inode(attr.st_ino + 1) is None
        root = meta.get_inode(1)
        assert root is not None and root.nlink == 2  # the failed mkdir counted no subdir
        await ops.release(fi.fh)

    trio.run(main)
    blocks.close()


def test_listing_sees_entries_added_and_removed_between_listings(mounted: Workspace) -> None:
    """A finished listing is answered from memory only while no entry changed anywhere."""
    d = mounted.mnt / "d"
    d.mkdir()
    (d / "a").write_bytes(b"1")
    assert os.listdir(d) == ["a"]
    assert os.listdir(d) == ["a"]
    (d / "b").write_bytes(b"2")
    assert sorted(os.listdir(d)) == ["a", "b"]
    (d / "a").unlink()
    assert os.listdir(d) == ["b"]
    os.rename(d / "b", mounted.mnt / "b")
    assert os.listdir(d) == []
    assert sorted(os.listdir(mounted.mnt)) == sorted([".workspace.initialized", "b", "d"])
