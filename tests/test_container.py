"""The container entrypoint (`wsfs run`, packaging/container/entrypoint.sh) run as a plain process.

There is no container engine here, so each test does what `docker run` / `docker stop` would:
start the entrypoint, let its child (the "notebook") write through the mount and into /data,
send SIGTERM, and check that every byte is in the store by mounting it again on an empty cache,
that nothing written to /data reached the store, and that no secret shows in `ps` or a log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, until, wait_for, wait_pid_gone
from faultproxy import FaultProxy
from s3servers import S3Server, _start_with_retries, rclone_binary

from wsfs import errors
from wsfs.runtime import force_unmount, is_mountpoint, pid_alive

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT_SH = ROOT / "packaging" / "container" / "entrypoint.sh"
DOCKERFILE = ROOT / "packaging" / "container" / "Dockerfile"
# `wsfs` for entrypoint.sh: this tree's code (a console script may be an older install).
WSFS_SCRIPT = (f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.path.insert(0, "
               f"{json.dumps(str(ROOT))}); from wsfs.commands.cli import main; "
               "sys.exit(main())' \"$@\"\n")

# The "notebook": writes through the mount and into the data dir, records itself, then waits.
# argv: MODE WORKSPACE DATA_DIR OUT_DIR; MODE is trap (SIGTERM: write goodbye, exit 0),
# ignore (SIGTERM is ignored: the entrypoint must SIGKILL it) or exit3 (exit 3 by itself).
CHILD = r'''
import os, signal, sys, time
mode, ws, data, out = sys.argv[1:5]
def save(rel, content):
    for root in (ws, os.path.join(out, "expected")):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
save("big.bin", os.urandom(3 * 1024 * 1024 + 12345))
if os.environ.get("CHILD_BACKLOG"):  # incompressible bytes for the stop to upload
    save("backlog.bin", os.urandom(int(os.environ["CHILD_BACKLOG"])))
for i in range(20):
    save(f"proj/src/m{i}.py", (f"# module {i}\n" + "x = %d\n" % i * i).encode())
token = open(os.path.join(out, "data-token")).read()
with open(os.path.join(data, "only-in-data-" + token), "w") as f:
    f.write(("DATA " + token + "\n") * 5000)
with open(os.path.join(out, "env.txt"), "w") as f:
    f.write("\n".join(f"{k}={v}" for k, v in sorted(os.environ.items())))
with open(os.path.join(out, "ids.txt"), "w") as f:
    f.write(f"{os.getuid()}:{os.getgid()}")
def on_usr1(signum, frame):
    open(os.path.join(out, "got-usr1"), "w").close()
def on_term(signum, frame):
    save("goodbye.txt", b"written while stopping\n")
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
if mode == "trap":
    signal.signal(signal.SIGTERM, on_term)
elif mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(out, "ready"), "w").close()
if mode == "exit3":
    sys.exit(3)
while True:
    time.sleep(0.1)  # the point: a child that idles until a signal ends it
'''


class Entrypoint:
    """One run of the entrypoint as a plain process, with its output in a file."""

    def __init__(self, ws: Workspace, mode: str, python: str = sys.executable) -> None:
        self.ws = ws
        self.out = ws.root / "out"
        self.out.mkdir(exist_ok=True)
        self.data = ws.root / "data"
        self.token = uuid.uuid4().hex
        (self.out / "data-token").write_text(self.token)
        (self.out / "child.py").write_text(CHILD)
        self.child = [python, str(self.out / "child.py"), mode, str(ws.mnt),
                      str(self.data), str(self.out)]
        self.log = ws.root / "entrypoint.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start_run(self, *extra: str, env: dict[str, str] | None = None) -> None:
        """`wsfs run --mount STORE MNT ... -- CHILD`."""
        argv = [sys.executable, "-m", "wsfs", "run", "--mount", self.ws.store_url,
                str(self.ws.mnt), "--data-dir", str(self.data), "--cache-dir",
                str(self.ws.cache_dir), "--flush-delay", "30", *extra, "--", *self.child]
        self._start(argv, {**os.environ, **self.ws.env, **(env or {})})

    def start_script(self, env: dict[str, str]) -> None:
        """packaging/container/entrypoint.sh CHILD, configured by the environment only."""
        bin_dir = self.ws.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "wsfs").write_text(WSFS_SCRIPT)
        (bin_dir / "wsfs").chmod(0o755)
        full = {**env, "PATH": f"{bin_dir}:{env.get('PATH', os.environ['PATH'])}",
                "WSFS_RUN_DIR": self.ws.env["WSFS_RUN_DIR"]}
        self._start([str(ENTRYPOINT_SH), *self.child], full)

    def _start(self, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        proc = self.proc
        ready = until(lambda: (self.out / "ready").exists() or proc.poll() is not None, timeout)
        assert proc.poll() is None, f"entrypoint exited early:\n{self.output()}"
        assert ready, f"the child never got ready:\n{self.output()}"

    def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"entrypoint still running:\n{self.output()}") from None

    def stop(self) -> None:
        """Teardown: never leave the entrypoint, its child or the mount behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.ws.teardown()

    def expected_files(self) -> dict[str, str]:
        root = self.out / "expected"
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file()}


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def store_contains(store_dir: Path, needle: bytes) -> bool:
    """Whether any object of a file:// store holds `needle`, as it is or zlib-compressed."""
    for path in store_dir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if needle in data:
            return True
        with contextlib.suppress(zlib.error):
            if needle in zlib.decompress(data):
                return True
    return False


def verify_on_empty_cache(ep: Entrypoint, *extra: str, goodbye: bool) -> Path:
    """Mount the store on a fresh cache: every file the child wrote, byte for byte."""
    ws = ep.ws
    assert not is_mountpoint(ws.mnt)
    mnt = ws.mount(*extra, cache_dir=ws.fresh_cache())
    got = tree_digests(mnt)
    expected = ep.expected_files()
    assert ("goodbye.txt" in expected) == goodbye
    assert {k: v for k, v in got.items() if k != ".workspace.initialized"} == expected
    return mnt


@pytest.fixture
def entry(ws: Workspace) -> Iterator[Entrypoint]:
    ep = Entrypoint(ws, "trap")
    yield ep
    ep.stop()


def test_sigterm_stops_the_command_flushes_everything_and_exits_0(entry: Entrypoint) -> None:
    entry.start_run("--stop-timeout", "20")
    entry.wait_ready()
    assert entry.proc is not None
    assert is_mountpoint(entry.ws.mnt)
    entry.proc.send_signal(signal.SIGUSR1)  # forwarded to the child as it is
    wait_for("SIGUSR1 forwarded to the child", (entry.out / "got-usr1").exists, timeout=10)
    # flush_delay 30: the data is still dirty, so the stop below is what uploads it.
    wait_for("the child's data dirty", lambda: entry.ws.status()["dirty_bytes"] > 0, timeout=5)
    entry.proc.send_signal(signal.SIGTERM)
    assert entry.wait() == 0, entry.output()
    out = entry.output()
    assert "flushing:" in out and "every block is in the store" in out, out
    assert not is_mountpoint(entry.ws.mnt)
    assert entry.ws.status()["state"] == "done"
    entry.ws.check_log()
    verify_on_empty_cache(entry, goodbye=True)
    entry.ws.unmount()


def test_command_ignoring_sigterm_is_killed_after_the_stop_timeout(ws: Workspace) -> None:
    ep = Entrypoint(ws, "ignore")
    try:
        ep.start_run("--stop-timeout", "1.5")
        ep.wait_ready()
        assert ep.proc is not None
        start = time.monotonic()
        ep.proc.send_signal(signal.SIGTERM)
        assert ep.wait() == 0, ep.output()
        assert time.monotonic() - start >= 1.5
        assert "SIGKILL" in ep.output()
        verify_on_empty_cache(ep, goodbye=False)
        ws.unmount()
    finally:
        ep.stop()


def test_command_exit_status_passes_through_and_data_stays_local(ws: Workspace) -> None:
    ep = Entrypoint(ws, "exit3")
    try:
        ep.start_run()
        assert ep.wait() == 3, ep.output()
        assert "every block is in the store" in ep.output()
        assert not is_mountpoint(ws.mnt)
        # /data: an ordinary local directory, whose files stay there and nowhere else.
        data_file = ep.data / f"only-in-data-{ep.token}"
        assert data_file.read_text().startswith(f"DATA {ep.token}")
        assert os.stat(ep.data).st_dev == os.stat(ws.root).st_dev
        store_dir = Path(ws.store_url.removeprefix("file://"))
        assert store_contains(store_dir, b"# module 7\n"), "control: workspace data is found"
        assert not store_contains(store_dir, ep.token.encode())
        mnt = verify_on_empty_cache(ep, goodbye=False)
        assert not any(ep.token in p.name for p in mnt.rglob("*"))
        ws.unmount()
    finally:
        ep.stop()


def test_data_dir_inside_the_workspace_is_refused(ws: Workspace) -> None:
    result = ws.wsfs("run", "--mount", ws.store_url, str(ws.mnt), "--data-dir",
                     str(ws.mnt / "data"), "--cache-dir", str(ws.cache_dir), "--", "true",
                     check=False)
    assert result.returncode == errors.UsageError.exit_code, result.stderr
    assert "must not contain each other" in result.stderr
    assert not is_mountpoint(ws.mnt)


def test_an_empty_data_dir_means_none(ws: Workspace) -> None:
    """`--data-dir ''` (what the container script passes for an empty WSFS_DATA_DIR) means
    no data dir, not the working directory: run from the workspace's parent, as a container
    whose working directory is / is, that was refused as a data dir containing it."""
    result = subprocess.run(
        [*WSFS, "run", "--mount", ws.store_url, str(ws.mnt), "--data-dir", "", "--cache-dir",
         str(ws.cache_dir), "--", "true"],
        cwd=ws.mnt.parent, env={**os.environ, **ws.env}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert not is_mountpoint(ws.mnt)


@pytest.mark.parametrize(("kind", "code"), [("missing", 127), ("not executable", 126)])
def test_a_command_that_cannot_start_exits_as_in_a_shell(ws: Workspace, kind: str,
                                                         code: int) -> None:
    """127 for a command not found, 126 for one found but not executable, as sh does; one
    sentence, no traceback, and the workspace unmounted again."""
    if kind == "missing":
        command = f"nosuchcmd-{uuid.uuid4().hex[:8]}"
    else:
        script = ws.root / "not-executable.sh"
        script.write_text("#!/bin/sh\necho hello\n")
        script.chmod(0o644)
        command = str(script)
    result = ws.wsfs("run", "--mount", ws.store_url, str(ws.mnt), "--data-dir",
                     str(ws.root / "data"), "--cache-dir", str(ws.cache_dir), "--", command,
                     check=False)
    assert result.returncode == code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("wsfs: ") and command in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mountpoint(ws.mnt)


def test_store_without_workspace_never_starts_the_command(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    ws = Workspace(tmp_path, f"file://{tmp_path / 'store'}")
    ep = Entrypoint(ws, "trap")
    try:
        ep.start_run()
        assert ep.wait() == errors.NoWorkspaceError.exit_code, ep.output()
        assert "no wsfs workspace" in ep.output()
        assert not (ep.out / "ready").exists()
        assert not is_mountpoint(ws.mnt)
    finally:
        ep.stop()


def process_tree(root: int) -> list[int]:
    """`root` and every process below it: what a container's SIGKILL reaches (`wsfs run` is
    a subreaper, so the daemon, forked off by the mount, is reparented under it)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(") ", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


UPLINK = 4 << 20  # bytes per second through the proxy during the stop
BACKLOG = 21 << 20  # + the child's 3 MiB: about 6 s of that uplink
GRACE = 6.0  # the child ignores SIGTERM for its whole --stop-timeout
KILL_AFTER = 10.0  # Docker's default


@pytest.mark.timeout(240)
def test_sigterm_uploads_at_once_so_a_sigkill_10s_later_loses_nothing(
        proxied: tuple[Workspace, FaultProxy]) -> None:
    """`docker stop`: SIGTERM, then SIGKILL of every process 10 s later. The child ignores
    SIGTERM and takes its whole 6 s grace, and the backlog needs about 6 s of the throttled
    uplink: an upload that starts at the SIGTERM ends in time, one that waits for the child
    (~12 s) does not."""
    ws, proxy = proxied
    ep = Entrypoint(ws, "ignore")
    try:
        ep.start_run("--stop-timeout", str(GRACE), env={"CHILD_BACKLOG": str(BACKLOG)})
        ep.wait_ready()
        assert ep.proc is not None
        wait_for("the backlog dirty", lambda: int(ws.status()["dirty_bytes"]) >= BACKLOG,
                 timeout=10)
        daemon = ws.daemon_pid()
        assert daemon is not None
        proxy.throttle(UPLINK)
        sigterm = time.monotonic()
        ep.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            ep.proc.wait(KILL_AFTER)
        stopped = ep.proc.poll()
        took = time.monotonic() - sigterm
        for pid in {*process_tree(ep.proc.pid), daemon}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ep.proc.wait()
        wait_pid_gone(daemon)
        force_unmount(ws.mnt)
        proxy.throttle(None)
        print(f"stop of {(BACKLOG + (3 << 20)) / (1 << 20):.0f} MiB at "
              f"{UPLINK / (1 << 20):.0f} MiB/s with a {GRACE:.0f} s child: "
              f"{'exited ' + str(stopped) if stopped is not None else 'killed'} "
              f"after {took:.1f} s")
        # --force: a new container after a SIGKILL finds the lease of the killed one.
        verify_on_empty_cache(ep, "--force", goodbye=False)
        assert stopped == 0, f"not stopped {KILL_AFTER} s after SIGTERM:\n{ep.output()}"
        assert "uploading the workspace's changes now" in ep.output()
        ws.unmount()
    finally:
        proxy.throttle(None)
        ep.stop()


# -- the shell entrypoint, S3 and credentials ------------------------------------------------

@pytest.fixture(scope="module")
def secret_rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """`rclone serve s3` with keys of its own (it checks them), so a leaked secret is ours."""
    access, secret = f"ak{uuid.uuid4().hex[:10]}", f"sk-wsfs-secret-{uuid.uuid4().hex}"
    root = tmp_path_factory.mktemp("rclone-secret")
    server = _start_with_retries(
        "rclone", lambda port: [rclone_binary(), "serve", "s3", "--auth-key",
                                f"{access},{secret}", "--addr", f"127.0.0.1:{port}",
                                str(root)], access, secret)
    yield server
    server.stop()


def ps_lines_with(secret: str, server: S3Server) -> list[str]:
    """`ps -eo args` lines that show the secret, apart from the S3 server's own."""
    assert server.process is not None
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines()
            if secret in line and line.split()[0] != str(server.process.pid)]


def write_credentials(path: Path, server: S3Server, mode: int) -> None:
    path.write_text(f"[default]\naws_access_key_id = {server.access_key}\n"
                    f"aws_secret_access_key = {server.secret_key}\n")
    path.chmod(mode)


def keyless_env(server: S3Server) -> dict[str, str]:
    """The server's environment without its keys: they must come from the credentials file."""
    env = server.env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    return env


@pytest.mark.timeout(240)
def test_entrypoint_script_on_s3_with_a_credentials_file(
        secret_rclone: S3Server, tmp_path: Path) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    secret_rclone.create_bucket(bucket)
    ws = Workspace(tmp_path, f"s3://{bucket}/nb", env=secret_rclone.env())
    creds = tmp_path / "s3.credentials"
    write_credentials(creds, secret_rclone, 0o600)
    ep = Entrypoint(ws, "trap")
    env = {**keyless_env(secret_rclone),
           "WSFS_STORE": ws.store_url, "WSFS_MOUNTPOINT": str(ws.mnt),
           "WSFS_DATA_DIR": str(ep.data), "WSFS_CACHE_DIR": str(ws.cache_dir),
           "WSFS_CACHE_SIZE": "64M", "WSFS_FLUSH_DELAY": "30", "WSFS_STOP_TIMEOUT": "20",
           "WSFS_ENDPOINT_URL": secret_rclone.endpoint_url, "WSFS_INIT": "1",
           "WSFS_FRAMEWORK": "miniconda", "WSFS_LABELS": "team=ml,tier=gpu",
           "WSFS_CREDENTIALS_FILE": str(creds), "WSFS_VERBOSE": "1"}
    env.pop("AWS_ENDPOINT_URL")  # WSFS_ENDPOINT_URL must be what points wsfs at the server
    try:
        ep.start_script(env)
        ep.wait_ready()
        secret = secret_rclone.secret_key
        assert ps_lines_with(secret, secret_rclone) == []
        child_env = (ep.out / "env.txt").read_text()
        assert secret not in child_env
        assert "AWS_SHARED_CREDENTIALS_FILE" not in child_env
        assert ep.proc is not None
        ep.proc.send_signal(signal.SIGTERM)
        assert ep.wait() == 0, ep.output()
        for text in (ep.output(), ws.cache.log.read_text()):
            assert secret not in text
            assert secret_rclone.access_key not in text
        assert "every block is in the store" in ep.output()
        mnt = verify_on_empty_cache(ep, goodbye=True)  # with the keys from the environment
        assert ps_lines_with(secret, secret_rclone) == []
        marker = (mnt / ".workspace.initialized").read_text()
        assert '"miniconda"' in marker and '"tier": "gpu"' in marker
        ws.unmount()
    finally:
        ep.stop()


def test_credentials_file_readable_by_others_is_refused(
        secret_rclone: S3Server, tmp_path: Path) -> None:
    ws = Workspace(tmp_path, "s3://no-such-bucket-needed/nb", env=keyless_env(secret_rclone))
    creds = tmp_path / "s3.credentials"
    write_credentials(creds, secret_rclone, 0o644)
    result = ws.wsfs("run", "--mount", ws.store_url, str(ws.mnt), "--data-dir",
                     str(tmp_path / "data"), "--credentials-file", str(creds), "--", "true",
                     check=False)
    assert result.returncode == errors.UsageError.exit_code, result.stderr
    assert f"chmod 600 {creds}" in result.stderr
    assert secret_rclone.secret_key not in result.stderr
    assert not is_mountpoint(ws.mnt)


def dockerfile_env_and_cmd() -> tuple[dict[str, str], list[str]]:
    """The example image's ENV and CMD, as `docker build` reads them."""
    env: dict[str, str] = {}
    cmd: list[str] = []
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))  # type: ignore[misc]
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return env, cmd


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="wsfs-image-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    if not is_mountpoint(root / "mnt"):  # never delete through a mount left behind
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(240)
def test_the_image_runs_the_notebook_as_its_user_with_its_environment(open_root: Path) -> None:
    """The example image's ENV and CMD through entrypoint.sh, at a notebook's first start
    (WSFS_INIT=1): the command runs as WSFS_USER with the container's environment, the S3
    keys excepted, and owns the new workspace's root and /data, so it can write there."""
    image_env, cmd = dockerfile_env_and_cmd()
    assert cmd[:2] == ["jupyter", "lab"], cmd  # the notebook itself: no --reset-env wrapper
    assert image_env["WSFS_USER"] == "jovyan"
    nobody = pwd.getpwnam("nobody")  # this machine has no jovyan: the same with another user
    python = "/usr/bin/python3"  # the child needs a Python that nobody may run (a venv under
    if not os.access(python, os.X_OK):  # /root is root's alone)
        pytest.skip(f"no {python}")
    (open_root / "store").mkdir()
    ws = Workspace(open_root, f"file://{open_root / 'store'}")  # no workspace yet
    ep = Entrypoint(ws, "trap", python)
    ep.out.chmod(0o777)
    token, secret = uuid.uuid4().hex, f"sk-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WSFS_", "AWS_"))}
    env.update(image_env)
    env.update({"WSFS_USER": "nobody", "WSFS_MOUNTPOINT": str(ws.mnt),
                "WSFS_DATA_DIR": str(ep.data), "WSFS_CACHE_DIR": str(ws.cache_dir),
                "WSFS_STORE": ws.store_url, "WSFS_INIT": "1", "WSFS_FLUSH_DELAY": "30",
                "JUPYTER_TOKEN": token, "CUDA_VISIBLE_DEVICES": "0,1",
                "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": secret})
    try:
        ep.start_script(env)
        ep.wait_ready()
        assert (ep.out / "ids.txt").read_text() == f"{nobody.pw_uid}:{nobody.pw_gid}"
        child = dict(line.split("=", 1) for line in
                     (ep.out / "env.txt").read_text().splitlines() if "=" in line)
        assert child["JUPYTER_TOKEN"] == token
        assert child["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert child["HOME"] == nobody.pw_dir
        assert child["USER"] == child["LOGNAME"] == "nobody"
        assert child["PATH"].endswith(env["PATH"])
        assert "AWS_ACCESS_KEY_ID" not in child and secret not in str(child)
        assert ep.data.stat().st_uid == nobody.pw_uid
        assert ep.proc is not None
        ep.proc.send_signal(signal.SIGTERM)
        assert ep.wait() == 0, ep.output()
        mnt = verify_on_empty_cache(ep, goodbye=True)
        assert (mnt.stat().st_uid, mnt.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert (mnt / "big.bin").stat().st_uid == nobody.pw_uid
        ws.unmount()
    finally:
        ep.stop()


def test_entrypoint_script_needs_a_user_of_the_image(tmp_path: Path) -> None:
    env = {**os.environ, "WSFS_STORE": f"file://{tmp_path}", "WSFS_USER": "no-such-user-wsfs"}
    result = subprocess.run([str(ENTRYPOINT_SH), "true"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2
    assert "WSFS_USER=no-such-user-wsfs" in result.stderr


def test_entrypoint_script_needs_a_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSFS_")}
    result = subprocess.run([str(ENTRYPOINT_SH), "true"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2
    assert "WSFS_STORE" in result.stderr


def test_daemon_death_stops_the_command(ws: Workspace) -> None:
    ep = Entrypoint(ws, "trap")
    try:
        ep.start_run("--stop-timeout", "5")
        ep.wait_ready()
        pid = ws.daemon_pid()
        assert pid is not None and pid_alive(pid)
        os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid)
        assert ep.wait() == errors.MountError.exit_code, ep.output()
        assert "daemon" in ep.output() and "died" in ep.output()
        assert not is_mountpoint(ws.mnt)
    finally:
        ep.stop()
