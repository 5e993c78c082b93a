"""Round trip of a realistic tree through a real mount, on every kind of store.

A tree like the ones notebooks hold (an installed package set, plus every kind of file and
attribute that tar, pip and git rely on) is built on the local disk, copied onto the mount with
`cp -a`, compared attribute by attribute, then compared again after a remount on an empty cache
dir: the state a fresh machine starts from. On that fresh mount, listing and stat-ing the tree
must download nothing; file data comes down only when a file is read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Workspace, wait_for
from treecompare import Snapshot, assert_same, snapshot

from wsfs.blocks.pack import PACK_TARGET
from wsfs.cachedir import CacheDir

MiB = 1 << 20
GiB = 1 << 30
PACKAGES = ("trio", "idna", "attrs", "attr", "sniffio", "outcome")
T0 = 1_600_000_000_123_456_789  # a nanosecond-precise moment in 2020


def package_dirs() -> list[Path]:
    """Installed package dirs (and their .dist-info) that this test suite's dependencies bring."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, f"{name} is not installed"
        pkg = Path(spec.origin).parent
        dirs.append(pkg)
        dirs.extend(pkg.parent.glob(f"{name}-*.dist-info"))
    return dirs


def build_tree(src: Path) -> None:
    """Everything a workspace must keep: content, every file type, every attribute."""
    src.mkdir()
    pkgs = src / "site-packages"
    pkgs.mkdir()
    for d in package_dirs():
        shutil.copytree(d, pkgs / d.name, symlinks=True, copy_function=shutil.copy2)

    links = src / "links"
    links.mkdir()
    os.symlink("../site-packages/idna/core.py", links / "relative")
    os.symlink("/usr/bin/env", links / "absolute")
    os.symlink("no/such/target", links / "dangling")
    os.symlink("../site-packages/trio", links / "to-dir")
    os.symlink("relative", links / "chain")

    bin_ = src / "bin"
    bin_.mkdir()
    (bin_ / "hello").write_text("#!/bin/sh\necho hello from the workspace\n")
    os.chmod(bin_ / "hello", 0o755)

    private = src / "private"
    private.mkdir()
    os.chmod(private, 0o700)
    (private / "secret").write_text("s3cr3t\n")
    os.chmod(private / "secret", 0o600)

    data = src / "data"
    data.mkdir()
    (data / "a.txt").write_text("one inode, three names\n")
    os.link(data / "a.txt", data / "b.txt")
    os.link(data / "a.txt", private / "c.txt")
    os.setxattr(data / "a.txt", "user.comment", b"shared by all three names")
    os.setxattr(data, "user.dir-attr", b"on a directory")
    os.setxattr(bin_ / "hello", "user.empty", b"")
    os.setxattr(bin_ / "hello", "user.binary", bytes(range(256)))

    sparse = data / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(GiB)
        for off, island in ((0, b"head"), (512 * MiB - 3, b"across-a-block-boundary"),
                            (700 * MiB + 12345, os.urandom(3000)), (GiB - 5, b"tail!")):
            f.seek(off)
            f.write(island)

    (src / "empty-dir" / "nested-empty").mkdir(parents=True)
    (src / "empty.txt").write_bytes(b"")
    (data / "exactly-1MiB.bin").write_bytes(os.urandom(MiB))
    (data / "1MiB-plus-1.bin").write_bytes(os.urandom(MiB + 1))

    names = src / "names"
    names.mkdir()
    (names / "naïve café.txt").write_text("unicode\n")
    (names / "日本語").mkdir()
    (names / "日本語" / "ファイル.txt").write_text("japanese\n")
    (names / "with space").mkdir()
    (names / "with space" / "  two  spaces  .txt").write_text("spaces\n")
    (names / "emoji 🎉.txt").write_text("party\n")
    (names / ("x" * 255)).write_text("the longest name allowed\n")
    (names / "-dash & $dollar 'quote'").write_text("shell-hostile\n")

    os.chown(data / "exactly-1MiB.bin", 1234, 5678)
    os.chown(names / "日本語", 4321, 8765)
    os.lchown(links / "dangling", 2222, 3333)

    # Nanosecond times, set last and deepest first so nothing bumps them afterwards.
    os.utime(data / "a.txt", ns=(T0 + 1, T0 + 999_999_999))
    os.utime(bin_ / "hello", ns=(T0 + 7, T0 + 42))
    os.utime(links / "dangling", ns=(T0 + 3, T0 + 5), follow_symlinks=False)
    os.utime(names / "日本語" / "ファイル.txt", ns=(T0 + 11, T0 + 13))
    for d in (names / "日本語", names, data, src / "empty-dir" / "nested-empty", links):
        os.utime(d, ns=(T0 + 100, T0 + 200))


def copy_onto(src: Path, dst: Path) -> None:
    """`cp -a`: the way users copy trees, keeping holes, links, owners, xattrs and times."""
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True, timeout=300)


def wait_status(w: Workspace, after: float) -> dict[str, object]:
    """The daemon's status.json as written after `after` (it refreshes every 0.5 s)."""
    wait_for("a refresh of status.json", lambda: float(w.status()["time"]) > after, timeout=10)
    return w.status()


def downloads(w: Workspace) -> int:
    count = wait_status(w, time.time())["downloads"]
    assert isinstance(count, int)
    return count


def block_bytes(cache_dir: Path) -> int:
    """Bytes of downloaded block data in a cache dir: the clean cache's files and database."""
    clean = CacheDir(cache_dir).clean
    if not clean.exists():
        return 0
    return sum(p.stat().st_size for p in clean.rglob("*") if p.is_file())


def check_tree_works(tree: Path) -> None:
    """Use the tree the way a user would: run its program, import its packages, follow links."""
    out = subprocess.run([str(tree / "bin" / "hello")], capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout == "hello from the workspace\n"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import trio, idna, attr; "
            "print(idna.encode('bücher.example').decode(), trio.__name__)")
    out = subprocess.run([sys.executable, "-B", "-c", code, str(tree / "site-packages")],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["xn--bcher-kva.example", "trio"]
    assert (tree / "links" / "chain").read_text() == (
        tree / "site-packages" / "idna" / "core.py").read_text()
    assert (tree / "links" / "to-dir" / "__init__.py").is_file()
    assert not (tree / "links" / "dangling").exists()


def compare(expected: Snapshot, tree: Path, what: str) -> None:
    assert_same(expected, snapshot(tree), what=what)


@pytest.mark.timeout(600)
def test_realistic_tree_survives_a_fresh_machine(any_ws: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    expected = snapshot(src)
    files = sum(1 for e in expected.entries.values() if e.type == "file")
    assert files > 300, f"the package set shrank to {files} files; pick bigger packages"

    mnt = any_ws.mount()
    copy_onto(src, mnt / "tree")
    compare(expected, mnt / "tree", "right after cp -a onto the mount")
    check_tree_works(mnt / "tree")

    mnt = any_ws.remount(wipe_cache=True)
    tree = mnt / "tree"
    # A fresh machine sees the whole tree at once, and has downloaded no file data yet.
    assert downloads(any_ws) == 0
    empty_cache_bytes = block_bytes(any_ws.cache_dir)
    assert empty_cache_bytes < 256 * 1024, f"{empty_cache_bytes} bytes cached before any read"
    meta_only = snapshot(tree, content=False)
    assert_same(expected, meta_only, what="attributes after the cache-wiping remount")
    assert downloads(any_ws) == 0, "stat and readdir downloaded file data"

    # Reading one 2-block file downloads that file's objects (packs, with the files written
    # beside it: blocks/pack.py), not the tree.
    assert (tree / "data" / "1MiB-plus-1.bin").read_bytes() == (
        src / "data" / "1MiB-plus-1.bin").read_bytes()
    after_one = downloads(any_ws)
    assert 1 <= after_one <= 2, f"reading one 2-block file downloaded {after_one} objects"
    one_file_bytes = block_bytes(any_ws.cache_dir)
    assert MiB < one_file_bytes - empty_cache_bytes < 2 * PACK_TARGET + MiB

    compare(expected, tree, "content after the cache-wiping remount")
    assert downloads(any_ws) > after_one, "reading every file should have downloaded more"
    assert block_bytes(any_ws.cache_dir) > one_file_bytes
    check_tree_works(tree)
    any_ws.unmount()
