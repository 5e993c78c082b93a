"""Named snapshots and retention through real mounts (`wsfs snapshot`, `wsfs gc`, `wsfs fsck`,
`wsfs du`): a kept checkpoint stays whole while the live tree moves on, is deleted, gc'ed and
repacked around it; a damaged one is named by fsck; bad input changes nothing.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat
import time
from pathlib import Path

import pytest
import trio
from conftest import Workspace, wait_for

from wsfs.blocks import object_key
from wsfs.blocks import pack as packs
from wsfs.meta import checkpoint as ckpt
from wsfs.meta.history import read_snapshots
from wsfs.meta.superblock import read_superblock
from wsfs.store import LocalStore, ObjectStore

MiB = 1 << 20


def local_store(ws: Workspace) -> LocalStore:
    return LocalStore(Path(ws.store_url[len("file://"):]))


def store_keys(ws: Workspace) -> set[str]:
    return {k for k, _ in local_store(ws).list()}


def files_of_checkpoint(store: ObjectStore, seq: int, tmp: Path) -> dict[str, bytes]:
    """Every regular file of checkpoint `seq` but the marker, path -> content, read from the
    store's objects as a mount on an empty cache would (packs' checksums checked)."""
    block_size = read_superblock(store).block_size
    db = tmp / f"snap-{seq}.db"
    trio.run(lambda: ckpt.fetch(store, seq, db, trio.CapacityLimiter(4)))
    conn = sqlite3.connect(db)
    paths = {1: ""}
    todo = [1]
    out: dict[str, bytes] = {}
    while todo:
        parent = todo.pop()
        for name, ino, mode, size in conn.execute(
                "SELECT d.name, i.id, i.mode, i.size FROM dentries d JOIN inodes i"
                " ON i.id = d.inode WHERE d.parent=?", (parent,)).fetchall():
            path = f"{paths[parent]}/{os.fsdecode(name)}"
            if stat.S_ISDIR(mode):
                paths[ino] = path
                todo.append(ino)
            elif stat.S_ISREG(mode) and path != "/.workspace.initialized":
                data = bytearray(size)
                for idx, block_id, csum, pack in conn.execute(
                        "SELECT idx, id, csum, pack FROM blocks WHERE inode=?", (ino,)):
                    blob = store.get(object_key(pack or block_id))
                    content = packs.split(blob)[block_id][1] if pack else blob
                    assert csum is not None
                    start = idx * block_size
                    data[start:start + len(content)] = content[:max(0, size - start)]
                out[path] = bytes(data)
    conn.close()
    return out


def write_tree(mnt: Path, seed: str) -> dict[str, bytes]:
    """Small files (one pack) and a big one (blocks of their own)."""
    rnd = random.Random(seed)
    (mnt / "proj").mkdir()
    files = {f"/proj/f{i:03d}": rnd.randbytes(rnd.randrange(2_000, 20_000)) for i in range(120)}
    files["/proj/big.bin"] = rnd.randbytes(3 * MiB + 17)
    for path, data in files.items():
        (mnt / path[1:]).write_bytes(data)
    return files


def fsck(ws: Workspace, *args: str) -> tuple[int, str]:
    r = ws.wsfs("fsck", ws.store_url, *args, check=False, timeout=300)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_a_snapshot_survives_deletes_gc_and_repacking(ws: Workspace) -> None:
    """Write a tree, name the checkpoint, delete and rewrite most of the tree, let the daemon
    repack and thin (keeping only the newest by schedule) and gc collect: the named checkpoint
    still reads back byte for byte from the store and passes fsck --verify-data, and
    `snapshot list` and `du` say what it holds. Without the name, the same checkpoint is
    thinned and its blocks go."""
    ws.env.update(WSFS_REPACK_INTERVAL="0.5", WSFS_THIN_INTERVAL="0", WSFS_KEEP="0")
    mnt = ws.mount(flush_delay=0.5)
    files = write_tree(mnt, "snap")
    r = ws.wsfs("snapshot", "create", str(mnt), "before")  # syncs first: it holds the tree
    assert "snapshot before: checkpoint #" in r.stdout, r.stdout
    snaps = read_snapshots(local_store(ws))
    pinned = snaps["before"].seq
    unnamed = ckpt.read_head(local_store(ws))
    assert unnamed == pinned
    # most of the tree goes, a few files are rewritten: the pack is mostly dead
    rnd = random.Random(1)
    (mnt / "proj" / "big.bin").unlink()
    for i in range(120):
        path = mnt / "proj" / f"f{i:03d}"
        if i % 10:
            path.unlink()
        elif i < 30:
            path.write_bytes(rnd.randbytes(500))
    ws.wsfs("sync", str(mnt))
    wait_for("a repack pass to move the survivors", lambda: ws.status()["repacked_packs"] >= 1)
    ws.wsfs("sync", str(mnt))  # publishes the switch; the old pack is garbage now
    st = ws.status()
    assert st["keep"] == "0" and st["thinned_checkpoints"] >= 1 and st["thin_errors"] == 0, st
    assert st["kept_checkpoints"] == 2, st  # the newest and the named one
    ws.unmount()
    gc = json.loads(ws.wsfs("gc", ws.store_url, "--min-age", "0", "--keep", "0",
                            "--json").stdout)
    assert gc["snapshots"] == {"before": pinned} and pinned in gc["checkpoints_kept"], gc
    assert gc["objects_deleted"] == 0, gc  # the daemon had collected what nothing names
    store = local_store(ws)
    assert files_of_checkpoint(store, pinned, ws.root) == files
    code, out = fsck(ws, "--at", "before", "--verify-data")
    assert code == 0 and f'checkpoint {pinned} (snapshot "before")' in out and "clean" in out, out
    code, out = fsck(ws, "--verify-data")  # the newest and every named one
    assert code == 0 and out.count("clean: every referenced block") == 2, out
    listing = json.loads(ws.wsfs("snapshot", "list", ws.store_url, "--json").stdout)
    rows = {c["seq"]: c for c in listing["checkpoints"]}
    assert len(rows) == 2 and rows[pinned]["names"] == ["before"], listing
    assert rows[pinned]["files"] == len(files) + 1  # and the marker
    assert rows[pinned]["only_bytes"] >= len(files["/proj/big.bin"]), listing
    du = json.loads(ws.wsfs("du", ws.store_url, "--json").stdout)
    assert du["kept_checkpoints"] == 2 and du["snapshots"] == {"before": pinned}, du
    assert du["snapshot_only_bytes"]["before"] == rows[pinned]["only_bytes"], du
    assert du["older_bytes"] >= len(files["/proj/big.bin"]) and du["missing_objects"] == 0, du
    text = ws.wsfs("snapshot", "list", ws.store_url).stdout
    assert f"#{pinned}" in text and "before" in text and "(newest)" in text, text

    # Without the name the schedule lets it go, and gc with it every block only it named.
    before = store_keys(ws)
    ws.wsfs("snapshot", "delete", ws.store_url, "before")
    gc = json.loads(ws.wsfs("gc", ws.store_url, "--min-age", "0", "--keep", "0",
                            "--json").stdout)
    assert gc["manifests_deleted"] == 1 and gc["checkpoints_kept"] == [max(rows)], gc
    assert gc["object_bytes_deleted"] >= 3 * MiB, gc  # the big file's blocks at least
    assert len(store_keys(ws)) < len(before)
    code, out = fsck(ws, "--all", "--verify-data")
    assert code == 0, out


def test_fsck_names_a_damaged_snapshot_by_its_name(ws: Workspace) -> None:
    ws.env.update(WSFS_KEEP="0", WSFS_THIN_INTERVAL="0")
    mnt = ws.mount(flush_delay=0.5)
    (mnt / "gone.bin").write_bytes(os.urandom(2 * MiB))
    ws.wsfs("snapshot", "create", str(mnt), "keepme")
    (mnt / "gone.bin").unlink()
    (mnt / "other").write_bytes(b"the newest is fine")
    ws.unmount()
    store = local_store(ws)
    pinned = read_snapshots(store)["keepme"].seq
    newest = ckpt.read_head(store)
    assert newest is not None and newest > pinned
    # the big file's blocks are named by the snapshot alone: lose one
    only = files_of_checkpoint(store, pinned, ws.root)["/gone.bin"]
    assert len(only) == 2 * MiB
    (victim,) = [k for k, size in store.list("data/") if size >= 2 * MiB]  # its pack
    store.delete(victim)
    code, out = fsck(ws)
    assert code == 9, out
    assert f'checkpoint {pinned} (snapshot "keepme")' in out and "DAMAGED /gone.bin" in out, out
    assert f"checkpoint {newest} of" in out and "clean: every" in out, out  # the newest is whole
    assert f'damaged in checkpoint {pinned} (snapshot "keepme")' in out, out  # stderr's sentence
    listing = ws.wsfs("snapshot", "list", ws.store_url).stdout
    assert "DAMAGED: 1 objects missing" in listing, listing


def test_bad_snapshot_input_is_one_sentence_and_changes_nothing(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=0.5)
    (mnt / "f").write_bytes(b"x")
    ws.wsfs("snapshot", "create", str(mnt), "first")
    ws.unmount()
    before = {k: local_store(ws).get(k) for k in store_keys(ws)}
    now = time.time()
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now + 3600))
    cases = [
        (("create", ws.store_url, "first"), "a snapshot named 'first' exists already"),
        (("create", ws.store_url, "second", "--at", future), "is in the future"),
        (("create", ws.store_url, "second", "--at", "2001-01-01"), "before the first kept"),
        (("create", ws.store_url, "second", "--at", "#999"), "checkpoint 999 is not kept"),
        (("create", ws.store_url, "9lives"), "is not allowed"),
        (("create", ws.store_url, "second", "--at", "nosuch"), "no snapshot named 'nosuch'"),
        (("delete", ws.store_url, "nosuch"), "no snapshot named 'nosuch' (there are: first)"),
    ]
    for args, words in cases:
        r = ws.wsfs("snapshot", *args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and not r.stdout, (args, r.stderr)
    r = ws.wsfs("fsck", ws.store_url, "--at", "nosuch", check=False)
    assert r.returncode == 2 and "no snapshot named 'nosuch'" in r.stderr, r.stderr
    assert {k: local_store(ws).get(k) for k in store_keys(ws)} == before  # nothing changed
    # the same pins, by time and by name: the checkpoint at or before the time
    ws.wsfs("snapshot", "create", ws.store_url, "again", "--at", "first")
    ws.wsfs("snapshot", "create", ws.store_url, "bytime", "--at", "0m ago")
    snaps = read_snapshots(local_store(ws))
    assert snaps["again"].seq == snaps["first"].seq
    assert snaps["bytime"].seq == ckpt.read_head(local_store(ws))


def test_the_default_schedule_keeps_the_last_minutes_whole(ws: Workspace) -> None:
    """No name, the default schedule: a tree deleted a moment ago is still in the store, in
    the checkpoint before the delete, whole; gc with the same schedule keeps it too."""
    mnt = ws.mount(flush_delay=0.5)
    files = write_tree(mnt, "recent")
    ws.wsfs("sync", str(mnt))
    store = local_store(ws)
    had = ckpt.read_head(store)
    assert had is not None
    for path in files:
        (mnt / path[1:]).unlink()
    ws.wsfs("sync", str(mnt))
    ws.unmount()
    assert (ckpt.read_head(store) or 0) > had
    gc = json.loads(ws.wsfs("gc", ws.store_url, "--min-age", "0", "--json").stdout)
    assert had in gc["checkpoints_kept"] and gc["keep"] == "15m+48h:1h+30d:1d", gc
    assert files_of_checkpoint(store, had, ws.root) == files
    code, out = fsck(ws, "--at", str(had), "--verify-data")
    assert code == 0 and "clean" in out, out
