"""Bad input: every mistake a user can make gives one sentence, a distinct exit code, no mount.

Each case runs the real command line with a timeout (no hang) and checks: the exact exit code
from wsfs/errors.py, a single `wsfs: ...` line on stderr, no traceback, nothing mounted.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Workspace, run_wsfs, s3_workspace
from s3servers import S3Server, free_port

from wsfs.errors import (
    FormatError,
    LeaseError,
    MountError,
    NoWorkspaceError,
    StoreError,
    UsageError,
    WsfsError,
)
from wsfs.runtime import is_mountpoint

TIMEOUT = 60  # any case that takes longer than this counts as a hang


def check_refused(result: subprocess.CompletedProcess[str], code: int, *words: str,
                  mnt: Path | None = None) -> str:
    """Assert one clear sentence on stderr, exit `code`, no traceback, nothing mounted."""
    err = result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("wsfs: "), err
    assert len(lines[0]) < 400, err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    if mnt is not None:
        assert not is_mountpoint(mnt)
    return lines[0]


def attempt(ws: Workspace, *args: str, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return run_wsfs(*args, env={**ws.env, **(env or {})}, check=False, timeout=TIMEOUT)


def mount_args(ws: Workspace, *extra: str, store: str | None = None) -> list[str]:
    return ["mount", store or ws.store_url, str(ws.mnt), "--cache-dir", str(ws.cache_dir),
            *extra]


# -- store URLs -------------------------------------------------------------------------------

BAD_URLS = [
    ("workspace-bucket", "no scheme"),
    ("ftp://host/dir", "unknown scheme"),
    ("s3://", "names no bucket"),
    ("s3://Upper_Case/ws", "is invalid"),
    ("s3://ab/ws", "is invalid"),
    ("s3://key:secret@bucket/ws", "must not carry credentials"),
    ("s3://bucket/ws?versionId=1", "must not have"),
    ("s3://bucket/../ws", "invalid prefix component"),
    ("file://otherhost/dir", "names host"),
    ("file:relative/dir", "no scheme"),
]


@pytest.mark.parametrize(("url", "words"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_malformed_store_url(ws: Workspace, url: str, words: str) -> None:
    for args in (mount_args(ws, store=url), ["init", url]):
        check_refused(attempt(ws, *args), UsageError.exit_code, words, mnt=ws.mnt)


def test_malformed_endpoint_url(ws: Workspace) -> None:
    r = attempt(ws, *mount_args(ws, "--endpoint-url", "127.0.0.1:9000", store="s3://bucket/x"))
    check_refused(r, UsageError.exit_code, "is not an http(s) URL", mnt=ws.mnt)


# -- S3 stores that cannot be used --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["moto", "rclone"])
def test_unknown_bucket(kind: str, request: pytest.FixtureRequest, ws: Workspace) -> None:
    server: S3Server = request.getfixturevalue(f"{kind}_server")
    r = attempt(ws, *mount_args(ws, store="s3://no-such-bucket-wsfs/ws"), env=server.env())
    check_refused(r, StoreError.exit_code, "no-such-bucket-wsfs", mnt=ws.mnt)
    r = attempt(ws, "init", "s3://no-such-bucket-wsfs/ws", env=server.env())
    check_refused(r, StoreError.exit_code, "no-such-bucket-wsfs")


def test_wrong_credentials(rclone_server: S3Server, tmp_path: Path) -> None:
    """rclone serve s3 checks signatures (moto accepts any key, so it cannot be tested there)."""
    w = s3_workspace(rclone_server, tmp_path)
    w.init()
    try:
        for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            r = attempt(w, *mount_args(w), env={var: "wrong-wrong-wrong"})
            line = check_refused(r, StoreError.exit_code, mnt=w.mnt)
            assert "credential" in line.lower() or "access" in line.lower(), line
    finally:
        w.teardown()


def test_unreachable_endpoint(ws: Workspace, moto_server: S3Server) -> None:
    port = free_port()  # nothing listens there: connection refused
    env = {**moto_server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    r = attempt(ws, *mount_args(ws, store="s3://some-bucket/ws"), env=env)
    check_refused(r, StoreError.exit_code, f"127.0.0.1:{port}", mnt=ws.mnt)


# -- the workspace in the store -----------------------------------------------------------------

def test_store_without_workspace(ws: Workspace, tmp_path: Path) -> None:
    empty = f"file://{tmp_path / 'empty-store'}"
    r = attempt(ws, *mount_args(ws, store=empty))
    check_refused(r, NoWorkspaceError.exit_code, "wsfs init", mnt=ws.mnt)


def test_init_over_an_existing_workspace(ws: Workspace) -> None:
    check_refused(attempt(ws, "init", ws.store_url), WsfsError.exit_code, "already holds")


def test_store_from_a_newer_format(ws: Workspace) -> None:
    sb_path = Path(ws.store_url.removeprefix("file://")) / "wsfs.json"
    sb = json.loads(sb_path.read_text())
    sb["format"] = 99
    sb_path.write_text(json.dumps(sb))
    check_refused(attempt(ws, *mount_args(ws)), FormatError.exit_code, "format 99",
                  "upgrade wsfs", mnt=ws.mnt)


def test_cache_dir_of_another_workspace(ws: Workspace, tmp_path: Path) -> None:
    ws.mount()
    ws.unmount()
    other = Workspace(tmp_path / "other", f"file://{tmp_path / 'store2'}")
    other.init()
    r = attempt(other, *mount_args(other), "--cache-dir", str(ws.cache_dir))
    check_refused(r, MountError.exit_code, "another workspace", mnt=other.mnt)


# -- mountpoints ---------------------------------------------------------------------------------

def test_mountpoint_missing(ws: Workspace, tmp_path: Path) -> None:
    r = attempt(ws, "mount", ws.store_url, str(tmp_path / "nope"))
    check_refused(r, MountError.exit_code, "does not exist")


def test_mountpoint_not_a_directory(ws: Workspace, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    check_refused(attempt(ws, "mount", ws.store_url, str(f)), MountError.exit_code,
                  "not a directory")


def test_mountpoint_not_empty(ws: Workspace) -> None:
    (ws.mnt / "stray").write_text("x")
    check_refused(attempt(ws, *mount_args(ws)), MountError.exit_code, "not empty", "nonempty",
                  mnt=ws.mnt)


def test_mountpoint_already_mounted(ws: Workspace) -> None:
    ws.mount()
    # Same store, same mountpoint, other cache dir: the mountpoint check comes first.
    r = attempt(ws, *mount_args(ws, "--cache-dir", str(ws.root / "cache-x")))
    check_refused(r, MountError.exit_code, "already mounted")
    assert is_mountpoint(ws.mnt)
    ws.unmount()


def test_unmount_of_something_not_mounted(ws: Workspace) -> None:
    check_refused(attempt(ws, "unmount", str(ws.mnt)), MountError.exit_code, "not mounted")


# -- cache dirs ----------------------------------------------------------------------------------

def test_cache_dir_under_a_file(ws: Workspace, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = attempt(ws, *mount_args(ws, "--cache-dir", str(f / "cache")))
    check_refused(r, MountError.exit_code, "not writable", mnt=ws.mnt)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root ignores permission bits, not a read-only filesystem)."""
    d = tmp_path / "ro"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True, timeout=30)


def test_cache_dir_on_a_read_only_filesystem(ws: Workspace, read_only_dir: Path) -> None:
    for cache in (read_only_dir, read_only_dir / "sub"):
        r = attempt(ws, *mount_args(ws, "--cache-dir", str(cache)))
        check_refused(r, MountError.exit_code, "not writable", mnt=ws.mnt)


def test_cache_dir_inside_the_mountpoint(ws: Workspace) -> None:
    r = attempt(ws, *mount_args(ws, "--cache-dir", str(ws.mnt / "cache"), "-o", "nonempty"))
    check_refused(r, MountError.exit_code, "must not be inside", mnt=ws.mnt)


# -- sizes and options ---------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--cache-size", "banana"], "is not a size"),
    (["--cache-size", "0"], "more than zero"),
    (["--cache-size=-5G"], "is not a size"),
    (["--dirty-limit", "12Q"], "is not a size"),
    (["--flush-delay", "-1"], "zero or more"),
    (["--flush-delay", "soon"], "number of seconds"),
    (["--unmount-timeout", "nan"], "zero or more"),
    (["--unmount-timeout", "inf"], "zero or more"),
    (["-o", "bogus"], "unknown mount option 'bogus'"),
    (["-o", "rw,bogus=1"], "unknown mount option 'bogus=1'"),
    (["-o", "fsync=sometimes"], "-o fsync must be local or remote, not 'sometimes'"),
    (["-o", "cache_size=banana"], "is not a size"),
    (["-o", "flush_delay=-3"], "zero or more"),
    (["-o", "cache_dir"], "'cache_dir' needs a value: -o cache_dir=DIR"),
    (["-o", "ro,rw,default_permissions,bogus"], "unknown mount option 'bogus'"),
    (["--cache-dir="], "--cache-dir needs a directory"),  # not the working directory
    (["-o", "cache_dir="], "-o cache_dir needs a directory"),
]


@pytest.mark.parametrize(("extra", "words"), BAD_OPTIONS,
                         ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_nonsense_sizes_and_options(ws: Workspace, extra: list[str], words: str) -> None:
    check_refused(attempt(ws, *mount_args(ws, *extra)), UsageError.exit_code, words,
                  mnt=ws.mnt)
    assert not any(ws.cache_dir.glob("*")), "a refused mount must not touch the cache dir"


@pytest.mark.cli
@pytest.mark.parametrize(("args", "words"), [
    (["--owner", "root"], "UID:GID"),
    (["--label", "novalue"], "KEY=VALUE"),
])
def test_nonsense_init_options(tmp_path: Path, args: list[str], words: str) -> None:
    r = run_wsfs("init", f"file://{tmp_path / 's'}", *args, check=False, timeout=TIMEOUT)
    check_refused(r, UsageError.exit_code, words)


@pytest.mark.cli
def test_mount_init_owner_must_be_numbers(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_wsfs("mount", f"file://{tmp_path / 's'}", str(mnt), "--init", "--owner", "jovyan",
                 "--cache-dir", str(tmp_path / "cache"), check=False, timeout=TIMEOUT)
    check_refused(r, UsageError.exit_code, "UID:GID")


def test_bad_unmount_timeout(ws: Workspace) -> None:
    check_refused(attempt(ws, "unmount", str(ws.mnt), "--timeout", "-2"),
                  UsageError.exit_code, "zero or more")


def test_argparse_errors_are_usage_errors(ws: Workspace) -> None:
    """Missing arguments, unknown verbs and flags: one sentence too, not a usage dump."""
    for args, words in ((["mount"], "required"), (["frobnicate"], "invalid choice"),
                        (["mount", ws.store_url, str(ws.mnt), "--nope"], "--nope"),
                        (["mount", ws.store_url, str(ws.mnt), "--cache-size"], "expected one")):
        check_refused(attempt(ws, *args), UsageError.exit_code, words, "--help", mnt=ws.mnt)


@pytest.mark.cli
def test_exit_codes_are_distinct() -> None:
    codes = [c.exit_code for c in (WsfsError, UsageError, StoreError, NoWorkspaceError,
                                   LeaseError, MountError, FormatError)]
    assert len(set(codes)) == len(codes) and 0 not in codes
