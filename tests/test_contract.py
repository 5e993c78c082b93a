"""The workspace contract at the command line: the marker's content, the refused mounts and their
exit code, `wsfs mount --init`, and docs/exit-codes.md kept true to wsfs/errors.py.

(The marker's POSIX protection through the mount is tests/test_posix*.py's job.)
"""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import pytest
from conftest import Workspace

import wsfs
from wsfs import errors
from wsfs.cachedir import CacheDir
from wsfs.runtime import is_mountpoint

MARKER = ".workspace.initialized"
ROOT = Path(__file__).resolve().parent.parent


def marker_json(mnt: Path) -> dict[str, object]:
    return dict(json.loads((mnt / MARKER).read_text()))


def superblock(ws: Workspace) -> dict[str, object]:
    store_dir = Path(ws.store_url.removeprefix("file://"))
    return dict(json.loads((store_dir / "wsfs.json").read_text()))


def assert_refused(result: object, code: int, *words: str) -> None:
    """A refused command: the exit code, one sentence on stderr naming the fix, no traceback."""
    import subprocess

    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def bare(tmp_path: Path) -> Workspace:
    """A store location that holds no workspace yet (an empty directory)."""
    (tmp_path / "store").mkdir()
    return Workspace(tmp_path, f"file://{tmp_path / 'store'}")


def test_init_writes_the_marker_as_json(bare: Workspace) -> None:
    before = time.time()
    out = bare.wsfs("init", bare.store_url, "--framework", "pytorch",
                    "--label", "team=vision", "--label", "notebook=nb-42", "--label", "empty=")
    try:
        sb = superblock(bare)
        assert out.stdout.strip() == f"created workspace {sb['workspace_id']} in {bare.store_url}"
        mnt = bare.mount()
        info = marker_json(mnt)
        assert info["workspace_id"] == sb["workspace_id"]
        assert info["wsfs_version"] == wsfs.__version__
        assert info["framework"] == "pytorch"
        assert info["labels"] == {"team": "vision", "notebook": "nb-42", "empty": ""}
        created = time.mktime(time.strptime(str(info["created_at"]), "%Y-%m-%dT%H:%M:%SZ"))
        created -= time.timezone  # the string is UTC, mktime read it as local time
        assert before - 2 <= created <= time.time() + 2
        st = (mnt / MARKER).stat()
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o444
        bare.unmount()
    finally:
        bare.teardown()


def test_init_without_framework_records_null(bare: Workspace) -> None:
    bare.init()
    try:
        info = marker_json(bare.mount())
        assert info["framework"] is None
        assert info["labels"] == {}
        bare.unmount()
    finally:
        bare.teardown()


def test_init_refuses_a_store_that_holds_a_workspace(ws: Workspace) -> None:
    first = superblock(ws)["workspace_id"]
    result = ws.wsfs("init", ws.store_url, "--framework", "other", check=False)
    assert_refused(result, errors.WsfsError.exit_code, "already holds a workspace")
    assert superblock(ws)["workspace_id"] == first


def test_bad_label_is_a_usage_error(bare: Workspace) -> None:
    result = bare.wsfs("init", bare.store_url, "--label", "novalue", check=False)
    assert_refused(result, errors.UsageError.exit_code, "KEY=VALUE")
    assert not (Path(bare.store_url.removeprefix("file://")) / "wsfs.json").exists()


def test_mount_of_a_store_without_workspace_is_refused_with_exit_4(bare: Workspace) -> None:
    result = bare.wsfs("mount", bare.store_url, str(bare.mnt), "--cache-dir",
                       str(bare.cache_dir), check=False)
    assert_refused(result, errors.NoWorkspaceError.exit_code, "no wsfs workspace", "--init")
    assert not is_mountpoint(bare.mnt)
    assert not any(Path(bare.store_url.removeprefix("file://")).iterdir()), \
        "a refused mount must not write to the store"


def test_mount_without_workspace_on_s3_is_refused_with_exit_4(
        moto_server: object, tmp_path: Path) -> None:
    from conftest import s3_workspace

    w = s3_workspace(moto_server, tmp_path)  # type: ignore[arg-type]
    result = w.wsfs("mount", w.store_url, str(w.mnt), "--cache-dir", str(w.cache_dir),
                    check=False)
    assert_refused(result, errors.NoWorkspaceError.exit_code, "no wsfs workspace")
    assert not is_mountpoint(w.mnt)


def remove_marker_from_metadata(cache_dir: Path) -> None:
    """Craft the state a mount cannot produce: the workspace's metadata without the marker."""
    db = sqlite3.connect(CacheDir(cache_dir).meta_db)
    try:
        cur = db.execute("DELETE FROM dentries WHERE parent = 1 AND name = ?",
                         (MARKER.encode(),))
        assert cur.rowcount == 1
        db.commit()
    finally:
        db.close()


def test_mount_of_metadata_without_marker_is_refused_with_exit_4(ws: Workspace) -> None:
    mnt = ws.mount()
    (mnt / "notes.txt").write_text("kept\n")
    ws.unmount()
    remove_marker_from_metadata(ws.cache_dir)
    result = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-dir", str(ws.cache_dir),
                     check=False)
    assert_refused(result, errors.NoWorkspaceError.exit_code, MARKER)
    assert not is_mountpoint(ws.mnt)
    # The refusal releases the lease: the untouched store mounts on a fresh cache.
    mnt = ws.mount(cache_dir=ws.fresh_cache())
    assert (mnt / MARKER).exists()
    assert (mnt / "notes.txt").read_text() == "kept\n"
    ws.unmount()


def test_mount_init_creates_a_new_workspace(bare: Workspace) -> None:
    try:
        mnt = bare.mount("--init", "--framework", "tensorflow", "--label", "owner=alice")
        info = marker_json(mnt)
        assert info["framework"] == "tensorflow"
        assert info["labels"] == {"owner": "alice"}
        assert info["workspace_id"] == superblock(bare)["workspace_id"]
        (mnt / "first.txt").write_text("1\n")
        mnt = bare.remount(wipe_cache=True)  # a plain mount now finds the workspace
        assert marker_json(mnt) == info
        assert (mnt / "first.txt").read_text() == "1\n"
        bare.unmount()
    finally:
        bare.teardown()


def test_mount_init_owner_owns_the_new_root_directory(bare: Workspace) -> None:
    """`--owner UID:GID` with `--init`, as `wsfs init --owner`: a notebook user who is not the
    mounting root can write in the workspace it gets."""
    try:
        mnt = bare.mount("--init", "--owner", "4321:8765")
        st = mnt.stat()
        assert (st.st_uid, st.st_gid) == (4321, 8765)
        mnt = bare.remount(wipe_cache=True)  # it is in the store, not only in this cache
        st = mnt.stat()
        assert (st.st_uid, st.st_gid) == (4321, 8765)
        bare.unmount()
    finally:
        bare.teardown()


def test_mount_init_keeps_an_existing_workspace(ws: Workspace) -> None:
    first = superblock(ws)["workspace_id"]
    mnt = ws.mount()
    (mnt / "data.txt").write_text("old\n")
    original = marker_json(mnt)
    ws.unmount()
    mnt = ws.mount("--init", "--framework", "ignored", cache_dir=ws.fresh_cache())
    assert superblock(ws)["workspace_id"] == first
    assert marker_json(mnt) == original
    assert (mnt / "data.txt").read_text() == "old\n"
    ws.unmount()


@pytest.mark.cli
def test_exit_codes_are_documented() -> None:
    """docs/exit-codes.md lists every error class with the code wsfs/errors.py gives it."""
    doc = (ROOT / "docs" / "exit-codes.md").read_text()
    rows = {m.group(2): int(m.group(1))
            for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*`(\w+)`", doc, re.MULTILINE)}
    classes = {name: cls.exit_code for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.WsfsError)}
    assert rows == classes
    assert re.search(r"^\|\s*0\s*\|", doc, re.MULTILINE)
    assert re.search(r"^\|\s*130\s*\|", doc, re.MULTILINE)


# -- credentials: from the environment, never on a command line or in a log -----------------

from s3servers import S3Server  # noqa: E402
from test_container import ps_lines_with, secret_rclone  # noqa: E402

__all__ = ["secret_rclone"]  # the fixture, shared with test_container


def test_env_credentials_never_show_in_ps_or_logs(secret_rclone: S3Server,
                                                   tmp_path: Path) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    secret_rclone.create_bucket(bucket)
    ws = Workspace(tmp_path, f"s3://{bucket}/ws", env=secret_rclone.env())
    secret = secret_rclone.secret_key
    try:
        init = ws.wsfs("-v", "init", ws.store_url)
        mnt = ws.mount()
        (mnt / "f.txt").write_text("x\n")
        assert ps_lines_with(secret, secret_rclone) == []
        ws.unmount()
        assert secret not in init.stdout + init.stderr
        assert secret not in ws.cache.log.read_text()
        # A wrong secret: refused (exit 3) without echoing it.
        wrong = f"wrong-{uuid.uuid4().hex}"
        bad = Workspace(tmp_path / "bad", ws.store_url,
                        env={**secret_rclone.env(), "AWS_SECRET_ACCESS_KEY": wrong})
        result = bad.wsfs("-vv", "mount", bad.store_url, str(bad.mnt), "--cache-dir",
                          str(bad.cache_dir), check=False)
        assert result.returncode == errors.StoreError.exit_code, result.stderr
        assert wrong not in result.stdout + result.stderr
        assert not is_mountpoint(bad.mnt)
    finally:
        ws.teardown()
