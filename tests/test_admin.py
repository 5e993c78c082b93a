"""`wsfs du`, `ls`, `gc` and `destroy` against real stores, beside real mounts."""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, s3_workspace
from s3servers import S3Server

MiB = 1 << 20


@pytest.fixture(params=["file", "moto"])
def fm_ws(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Workspace]:
    """An initialised workspace on the file:// store and on moto."""
    if request.param == "file":
        w = Workspace(tmp_path, f"file://{tmp_path / 'store'}")
    else:
        w = s3_workspace(request.getfixturevalue("moto_server"), tmp_path)
    w.init()
    yield w
    w.teardown()


def as_json(ws: Workspace, *args: str) -> object:
    return json.loads(ws.wsfs(*args, "--json").stdout)


def store_dir(ws: Workspace) -> Path:
    assert ws.store_url.startswith("file://")
    return Path(ws.store_url[len("file://"):])


def store_files(ws: Workspace) -> dict[str, Path]:
    root = store_dir(ws)
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".wsfs-")}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def check_intact(ws: Workspace, mnt: Path) -> None:
    """After a collection: unmounted, the store misses no object, and a mount from an empty
    cache dir shows the tree as it was."""
    expected = tree(mnt)
    ws.unmount()
    du = as_json(ws, "du", ws.store_url)
    assert isinstance(du, dict) and du["missing_objects"] == 0
    ws.fresh_cache()
    assert tree(ws.mount()) == expected
    ws.unmount()


def test_du_sizes_and_largest_directories(fm_ws: Workspace, request: pytest.FixtureRequest
                                          ) -> None:
    mnt = fm_ws.mount()
    (mnt / ".cache" / "pip" / "wheels").mkdir(parents=True)
    (mnt / ".cache" / "pip" / "wheels" / "torch.whl").write_bytes(os.urandom(3 * MiB))
    (mnt / "src").mkdir()
    for i in range(5):
        (mnt / "src" / f"m{i}.py").write_text("x = 1\n" * 100)
    (mnt / "link").symlink_to("src/m0.py")
    os.link(mnt / "src" / "m0.py", mnt / "src" / "hard.py")  # counted once
    fm_ws.wsfs("sync", str(mnt))
    r = as_json(fm_ws, "du", fm_ws.store_url)  # while mounted: no mount needed, no conflict
    assert isinstance(r, dict)
    marker = (mnt / ".workspace.initialized").stat().st_size
    assert r["logical_bytes"] == 3 * MiB + 5 * 600 + marker
    assert r["files"] == 7 and r["symlinks"] == 1 and r["directories"] == 5
    assert r["missing_objects"] == 0
    # the marker (uploaded alone at init), then the wheel's three blocks and the five small
    # files in one or two packs (more only if flush cycles split them)
    assert 2 <= r["referenced_objects"] <= 1 + 3 + 5
    paths = [d["path"] for d in r["largest"]]
    assert paths[:3] == ["/.cache", "/.cache/pip", "/.cache/pip/wheels"]
    assert r["largest"][0]["bytes"] == 3 * MiB and "/src" in paths
    # stored figures agree with the store's own listing
    if fm_ws.store_url.startswith("file://"):
        files = store_files(fm_ws)
        assert r["objects"] == len(files)
        assert r["stored_bytes"] == sum(p.stat().st_size for p in files.values())
    else:
        server: S3Server = request.getfixturevalue("moto_server")
        bucket, prefix = fm_ws.store_url[5:].split("/", 1)
        listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        assert r["objects"] == listed["KeyCount"]
        assert r["stored_bytes"] == sum(o["Size"] for o in listed["Contents"])
    text = fm_ws.wsfs("du", fm_ws.store_url).stdout
    assert "/.cache/pip" in text and "logical size: 3.0 MiB" in text
    fm_ws.unmount()


def test_ls_every_workspace_in_a_bucket(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    a = Workspace(tmp_path / "a", f"s3://{bucket}/team/a", env=moto_server.env())
    b = Workspace(tmp_path / "b", f"s3://{bucket}/team/b", env=moto_server.env())
    try:
        a.init()
        b.init()
        mnt = a.mount()
        (mnt / "data.bin").write_bytes(os.urandom(MiB))
        a.wsfs("sync", str(mnt))
        rows = as_json(a, "ls", f"s3://{bucket}")
        assert isinstance(rows, list)
        by_url = {r["url"]: r for r in rows}
        assert set(by_url) == {a.store_url, b.store_url}
        ra, rb = by_url[a.store_url], by_url[b.store_url]
        assert ra["bytes"] > MiB > rb["bytes"] > 0
        assert ra["mounted_by"] and f"pid {a.daemon_pid()}" in ra["mounted_by"]
        assert rb["mounted_by"] is None and not rb["stale_lease"]
        assert time.time() - ra["last_used"] < 120 and rb["last_used"] is not None
        assert ra["workspace_id"] != rb["workspace_id"]
        text = a.wsfs("ls", f"s3://{bucket}/team").stdout
        assert "mounted" in text and "idle" in text
        # destroy b (not mounted) and it is gone from the listing; a is untouched
        b.wsfs("destroy", b.store_url, "--yes")
        rows = as_json(a, "ls", f"s3://{bucket}/team")
        assert isinstance(rows, list) and [r["url"] for r in rows] == [a.store_url]
        a.unmount()
        rows = as_json(a, "ls", f"s3://{bucket}")
        assert isinstance(rows, list) and rows[0]["mounted_by"] is None
        assert a.wsfs("ls", f"s3://{bucket}/nothing").stdout.strip() == "no workspaces here"
    finally:
        a.teardown()
        b.teardown()


def put_old(path: Path, data: bytes, age: float = 7200) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age
    os.utime(path, (t, t))


def plant_orphans(ws: Workspace, age: float) -> list[str]:
    """Unreferenced objects as a crashed upload or an old wsfs would leave them."""
    keys = []
    for _ in range(3):
        bid = secrets.token_hex(16)
        keys.append(f"data/{bid[:2]}/{bid}")
    page = b"orphan page " + os.urandom(16)
    keys.append(f"meta/pages/{hashlib.sha256(page).hexdigest()}")
    root = store_dir(ws)
    for k in keys:
        put_old(root / k, zlib.compress(page) if "pages" in k else os.urandom(1000), age)
    return keys


def test_gc_deletes_only_old_unreferenced_objects(ws: Workspace) -> None:
    mnt = ws.mount()
    (mnt / "keep").mkdir()
    for i in range(4):
        (mnt / "keep" / f"f{i}").write_bytes(os.urandom(100_000 + i))
    ws.wsfs("sync", str(mnt))
    old = plant_orphans(ws, age=7200)
    young = plant_orphans(ws, age=0)
    before = set(store_files(ws))

    dry = as_json(ws, "gc", ws.store_url, "--dry-run")
    assert isinstance(dry, dict) and dry["objects_deleted"] == 3 and dry["pages_deleted"] == 1
    assert set(store_files(ws)) == before

    r = as_json(ws, "gc", ws.store_url)  # default --min-age: one hour
    assert isinstance(r, dict)
    assert r["objects_deleted"] == 3 and r["pages_deleted"] == 1 and r["young_kept"] == 4
    after = set(store_files(ws))
    assert after == before - set(old)
    assert set(young) <= after
    check_intact(ws, mnt)


@pytest.mark.timeout(240)
def test_gc_while_mounted_and_writing_loses_nothing(ws: Workspace) -> None:
    """gc runs again and again beside a busy writer; a fresh machine then sees every byte.

    Everything in the store before the writing starts is made two hours old, so gc's
    reference check (not its grace period) is what protects the data that exists; what the
    writer uploads meanwhile is young, as in real life.
    """
    mnt = ws.mount(flush_delay=0.2)
    rng = random.Random(6)
    for d in range(3):
        (mnt / f"d{d}").mkdir()
        for i in range(6):
            (mnt / f"d{d}" / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    ws.wsfs("sync", str(mnt))
    root = store_dir(ws)
    t = time.time() - 7200
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (t, t))
    orphans = plant_orphans(ws, age=7200)

    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                d = mnt / f"d{n % 3}"
                target = d / f"f{rng.randrange(8)}"
                op = rng.random()
                if op < 0.5:
                    target.write_bytes(rng.randbytes(rng.randrange(1, 400_000)))
                elif op < 0.7 and target.exists():
                    target.unlink()
                elif op < 0.85 and target.exists():
                    with open(target, "r+b") as f:  # overwrite in the middle
                        f.seek(rng.randrange(max(1, target.stat().st_size)))
                        f.write(rng.randbytes(5000))
                else:
                    (d / f"new{n}").write_bytes(rng.randbytes(rng.randrange(1, 50_000)))
                time.sleep(0.01)  # the point: a steady churn, not a busy loop
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    runs = []
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            runs.append(as_json(ws, "gc", ws.store_url, "--min-age", "60"))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(runs) >= 2
    assert sum(r["objects_deleted"] for r in runs) >= 3  # type: ignore[index]
    assert not any((root / k).exists() for k in orphans)
    check_intact(ws, mnt)


def test_gc_refuses_after_an_unclean_stop(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=300)
    (mnt / "f").write_bytes(b"x" * 1000)
    ws.wsfs("sync", str(mnt))
    ws.kill()  # SIGKILL: the lease stays behind, naming a dead process
    r = ws.wsfs("gc", ws.store_url, check=False)
    assert r.returncode == 5, r.stderr
    assert "did not stop cleanly" in r.stderr and "--force" in r.stderr
    assert ws.wsfs("gc", ws.store_url, "--force").returncode == 0
    ws.mount()  # takes the dead holder's lease over; a clean unmount releases it
    ws.unmount()
    assert ws.wsfs("gc", ws.store_url).returncode == 0


def test_destroy_refuses_a_mount_that_started_during_its_prompt(ws: Workspace) -> None:
    """The lease is checked before the prompt and taken after it: a mount that started in
    between must make the destroy fail, not be taken over and deleted under its user."""
    wsid = json.loads((store_dir(ws) / "wsfs.json").read_text())["workspace_id"]
    prompt = subprocess.Popen([*WSFS, "destroy", ws.store_url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **ws.env})
    try:
        assert prompt.stderr is not None
        asked = ""
        while "confirm" not in asked:  # the lease is checked: it waits for the id now
            chunk = os.read(prompt.stderr.fileno(), 4096).decode()
            assert chunk, f"destroy ended before asking: {asked}"
            asked += chunk
        mnt = ws.mount()
        (mnt / "f").write_text("in use")
        _, err = prompt.communicate(wsid + "\n", timeout=60)
    finally:
        prompt.kill()
    assert prompt.returncode == 5 and "mounted" in err, asked + err
    assert (mnt / "f").read_text() == "in use"
    ws.unmount()
    assert (ws.mount(cache_dir=ws.fresh_cache()) / "f").read_text() == "in use"
    ws.unmount()


def test_destroy_needs_confirmation_and_no_mount(ws: Workspace) -> None:
    root = store_dir(ws)
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("not wsfs's")
    mnt = ws.mount()
    (mnt / "f").write_bytes(os.urandom(10_000))
    r = ws.wsfs("destroy", ws.store_url, "--yes", check=False)
    assert r.returncode == 5 and "mounted" in r.stderr
    ws.unmount()
    before = set(store_files(ws))

    wrong = ws.wsfs("destroy", ws.store_url, check=False)  # stdin is empty: no confirmation
    assert wrong.returncode == 1 and "nothing deleted" in wrong.stderr
    assert set(store_files(ws)) == before

    wsid = json.loads((root / "wsfs.json").read_text())["workspace_id"]
    done = subprocess.run([*WSFS, "destroy", ws.store_url], input=wsid + "\n", text=True,
                          capture_output=True, env={**os.environ, **ws.env}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "destroyed workspace" in done.stdout
    assert set(store_files(ws)) == {"notes/keep.txt"}
    again = ws.wsfs("mount", ws.store_url, str(ws.mnt), check=False)
    assert again.returncode == 4
    for verb in ("du", "gc", "destroy"):
        assert ws.wsfs(verb, ws.store_url, check=False).returncode == 4
