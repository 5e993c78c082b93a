"""What notebook users really do in /workspace, each checked again on a fresh machine.

A venv with a package pip installed from a wheel, a git repository, SQLite databases in both
journal modes (closed cleanly and abandoned mid-transaction), and Jupyter's atomic save. After
every workload the workspace is remounted on an empty cache dir, and the workload must find
its state exactly as it left it: timestamps included, since Python and git decide from them
whether a file changed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import Workspace

GIT = shutil.which("git")


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> str:
    """Run a command; fail the test with its output when it fails."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# -- a venv and pip ---------------------------------------------------------------------------

WHEEL_FILES = {
    "wsfsdemo/__init__.py": "from .util import answer\n\n\ndef main() -> None:\n"
                            "    print('answer', answer())\n",
    "wsfsdemo/util.py": "def answer() -> int:\n    return 42\n",
    "wsfsdemo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: wsfsdemo\nVersion: 1.0\n"
                                       "Summary: a package built by the test, offline\n",
    "wsfsdemo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: wsfs-tests\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n",
    "wsfsdemo-1.0.dist-info/entry_points.txt": "[console_scripts]\nwsfsdemo = wsfsdemo:main\n",
}


def build_wheel(dist: Path) -> Path:
    """A tiny pure-Python wheel, built by hand: no network, no setuptools or wheel needed."""
    dist.mkdir(parents=True, exist_ok=True)
    whl = dist / "wsfsdemo-1.0-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in WHEEL_FILES.items():
            data = text.encode()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
        record.append("wsfsdemo-1.0.dist-info/RECORD,,")
        z.writestr("wsfsdemo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return whl


def pycache_state(site: Path) -> dict[str, tuple[int, str]]:
    """Every .pyc of the package: mtime_ns and content hash (a rewrite changes both)."""
    pycs = sorted((site / "wsfsdemo" / "__pycache__").glob("*.pyc"))
    assert len(pycs) == 2, f"pip did not byte-compile the package: {pycs}"
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in pycs}


def test_venv_and_pip_install_survive(ws: Workspace, tmp_path: Path) -> None:
    whl = build_wheel(tmp_path / "dist")
    mnt = ws.mount()
    venv = mnt / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", py, "install", "--no-index",
        "--disable-pip-version-check", "--no-cache-dir", whl, timeout=180)
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    assert site.is_relative_to(venv)
    assert run(venv / "bin" / "wsfsdemo") == "answer 42\n"
    before = pycache_state(site)
    code = "import wsfsdemo, sys; print(wsfsdemo.answer(), sys.prefix)"
    assert run(py, "-c", code).split() == ["42", str(venv)]
    assert pycache_state(site) == before

    mnt = ws.remount(wipe_cache=True)
    # The sources kept their mtimes, so the .pyc files are fresh: importing must not rewrite
    # them (Python compares the source's mtime and size with the .pyc header).
    assert pycache_state(site) == before
    verbose = subprocess.run([str(py), "-v", "-c", code], capture_output=True, text=True,
                             timeout=60, check=True)
    assert verbose.stdout.split() == ["42", str(venv)]
    loaded = [line for line in verbose.stderr.splitlines() if "wsfsdemo" in line]
    assert any("matches" in line and "__init__.py" in line for line in loaded), loaded
    assert not any("bytecode is stale" in line or "wrote " in line for line in loaded), loaded
    assert pycache_state(site) == before
    assert run(venv / "bin" / "wsfsdemo") == "answer 42\n"
    ws.unmount()


# -- git --------------------------------------------------------------------------------------

GIT_ENV = {"GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.com",
           "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def git(repo: Path, *args: str) -> str:
    return run("git", "-C", repo, *args, env=GIT_ENV)


def make_source_tree(root: Path, files: int) -> None:
    for i in range(files):
        d = root / f"pkg{i % 12}" / f"mod{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.py").write_text(f"# file {i}\n" + "x = 1\n" * (i % 50))
    (root / "run.sh").write_text("#!/bin/sh\necho ok\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("pkg0/mod0/file0.py", root / "link.py")
    (root / "big.bin").write_bytes(os.urandom(3 << 20))


@pytest.mark.skipif(GIT is None, reason="git is not installed (tests/run.sh installs it)")
@pytest.mark.timeout(400)
def test_git_repository_survives(ws: Workspace) -> None:
    mnt = ws.mount()
    repo = mnt / "repo"
    repo.mkdir()
    make_source_tree(repo, 300)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    for i in range(0, 300, 60):
        path = repo / f"pkg{i % 12}" / f"mod{i % 5}" / f"file{i}.py"
        path.write_text(path.read_text() + "y = 2\n")
    git(repo, "rm", "-q", "pkg1/mod1/file1.py")
    git(repo, "mv", "pkg2", "renamed")
    git(repo, "commit", "-q", "-am", "second")
    assert git(repo, "status", "--porcelain") == ""
    head = git(repo, "rev-parse", "HEAD")
    tracked = git(repo, "ls-files").splitlines()
    assert len(tracked) == 302  # 300 + run.sh + link.py + big.bin - the removed one

    mnt = ws.remount(wipe_cache=True)
    # Without refreshing the index: every file's stat data (mtime, ctime, inode, size) is
    # what git recorded, so git sees no change without reading a byte.
    run("git", "-C", repo, "diff-files", "--quiet", env=GIT_ENV)
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "log", "--format=%s").split() == ["second", "first"]
    assert git(repo, "ls-files").splitlines() == tracked
    git(repo, "fsck", "--full", "--strict", "--no-progress")
    assert run(repo / "run.sh") == "ok\n"
    assert git(repo, "cat-file", "-p", "HEAD:link.py") == "pkg0/mod0/file0.py"
    ws.unmount()


# -- SQLite -----------------------------------------------------------------------------------

SQLITE_WRITER = textwrap.dedent("""
    import os, sqlite3, sys
    db, mode, txns, crash = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "crash"
    con = sqlite3.connect(db, isolation_level=None)
    assert con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
    con.execute("PRAGMA wal_autocheckpoint=0")  # committed data stays in the -wal file
    con.execute("PRAGMA cache_size=8")  # spill dirty pages into the db mid-transaction
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, txn INTEGER, payload BLOB)")
    con.execute("CREATE INDEX t_txn ON t (txn)")
    for i in range(txns):
        con.execute("BEGIN")
        con.executemany("INSERT INTO t (txn, payload) VALUES (?, ?)",
                        [(i, os.urandom(50 + (i * 37 + j * 101) % 3000)) for j in range(10)])
        if i % 7 == 3:
            con.execute("DELETE FROM t WHERE id = (SELECT min(id) FROM t)")
        con.execute("COMMIT")
    if crash:  # die inside a big transaction: a hot journal (or uncommitted WAL frames)
        con.execute("BEGIN")
        con.executemany("INSERT INTO t (txn, payload) VALUES (?, ?)",
                        [(-1, os.urandom(4000)) for _ in range(500)])
        con.execute("UPDATE t SET payload = zeroblob(10) WHERE txn < 10")
        os._exit(0)
    con.close()
""")


def deleted_rows(txns: int) -> int:
    return sum(1 for i in range(txns) if i % 7 == 3)


def check_db(db: Path, txns: int) -> None:
    """Integrity and content of a database: committed rows all there, nothing uncommitted."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # Each DELETE removed the oldest row: ids 1..deleted are gone, the rest are all there.
        deleted = deleted_rows(txns)
        assert con.execute("SELECT count(*), min(id), max(id), max(txn) FROM t").fetchone() == (
            txns * 10 - deleted, deleted + 1, txns * 10, txns - 1)
        assert con.execute("SELECT count(*) FROM t WHERE length(payload) = 10").fetchone()[0] == 0
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["wal", "delete"])
@pytest.mark.timeout(400)
def test_sqlite_survives(ws: Workspace, mode: str) -> None:
    txns = 150
    mnt = ws.mount()
    (mnt / "db").mkdir()
    clean, crashed = mnt / "db" / "clean.sqlite", mnt / "db" / "crashed.sqlite"
    run(sys.executable, "-c", SQLITE_WRITER, clean, mode, str(txns), "close", timeout=300)
    run(sys.executable, "-c", SQLITE_WRITER, crashed, mode, str(txns), "crash", timeout=300)
    leftover = crashed.with_name(crashed.name + ("-wal" if mode == "wal" else "-journal"))
    assert leftover.stat().st_size > 0, "the abandoned transaction left nothing to recover"
    check_db(clean, txns)

    mnt = ws.remount(wipe_cache=True)
    assert leftover.stat().st_size > 0
    check_db(clean, txns)
    check_db(crashed, txns)  # recovered from the -wal (or rolled back from the -journal)
    ws.unmount()


# -- Jupyter's atomic save --------------------------------------------------------------------

READER = textwrap.dedent("""
    import json, os, sys, time
    nb, stop = sys.argv[1], sys.argv[2]
    reads, bad, last = 0, [], -1
    done = False
    while not done:
        # Checked before the read: a file opened just before the last save's rename still
        # reads as the save before it; one opened after `stop` exists must read the last.
        done = os.path.exists(stop)
        try:
            with open(nb) as f:
                text = f.read()
        except FileNotFoundError:
            if last >= 0:
                bad.append("vanished")
            continue
        reads += 1
        try:
            n = json.loads(text)["metadata"]["save"]
        except Exception as e:
            bad.append(f"{type(e).__name__}: {len(text)} bytes")
            continue
        if n < last:
            bad.append(f"went back from save {last} to {n}")
        last = n
    print(json.dumps({"reads": reads, "bad": bad[:10], "last": last}))
""")


def notebook(n: int) -> str:
    cells = [{"cell_type": "code", "source": f"print({i} * {n})", "outputs": [],
              "metadata": {}, "execution_count": i} for i in range(20 + n)]
    return json.dumps({"cells": cells, "metadata": {"save": n}, "nbformat": 4,
                       "nbformat_minor": 5}, indent=1)


def atomic_save(path: Path, text: str) -> None:
    """What Jupyter does: write a temp file beside it, fsync, rename over the notebook."""
    tmp = path.with_name(f".~{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@pytest.mark.timeout(300)
def test_jupyter_atomic_save(ws: Workspace) -> None:
    mnt = ws.mount(flush_delay=0.05)  # uploads and checkpoints run while the saves go on
    nb = mnt / "work" / "analysis.ipynb"
    nb.parent.mkdir()
    atomic_save(nb, notebook(0))
    stop = mnt / "work" / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(nb), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        for n in range(1, 51):
            atomic_save(nb, notebook(n))
            assert json.loads(nb.read_text())["metadata"]["save"] == n
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["bad"] == [], seen
    assert seen["reads"] > 0 and seen["last"] == 50, seen
    stop.unlink()
    assert sorted(p.name for p in nb.parent.iterdir()) == ["analysis.ipynb"]

    mnt = ws.remount(wipe_cache=True)
    assert nb.read_text() == notebook(50)
    assert sorted(p.name for p in nb.parent.iterdir()) == ["analysis.ipynb"]
    ws.unmount()
