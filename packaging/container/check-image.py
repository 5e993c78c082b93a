"""Build and start the example image without a container engine, on a throwaway Debian machine.

    ../shared/tools/fresh-debian 'python3 packaging/container/check-image.py --throwaway'

Where no Docker engine runs (this project's CI machine), this does what `docker build` and
`docker run` would with packaging/container/Dockerfile, in the machine it runs in, which it
changes for good (packages, a user, /src, /workspace, /data): hence `--throwaway`.
- the build: the Dockerfile's COPY as cp, RUN as `bash -c`, ENV into the environment, on
  Debian 12 rather than the python:3.11-slim-bookworm image; `pip install` steps are skipped
  (the notebook's own packages: Debian's Python has no pip, and they are not wsfs's);
- the start: the entrypoint with the image's ENV and what a platform adds (a file:// store,
  WSFS_INIT=1, JUPYTER_TOKEN, CUDA_VISIBLE_DEVICES, S3 keys), a shell standing in for the CMD.
It checks that the command runs as the image's user with the container's environment but not
the keys, owns /workspace (created at start) and /data, and that after SIGTERM the entrypoint
exits 0 and a mount on an empty cache reads every byte back. Exit 0 when all holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTEXT = HERE.parent.parent  # `docker build -f packaging/container/Dockerfile .`
STORE = Path("/srv/check-image-store")
PLATFORM = {"WSFS_STORE": f"file://{STORE}", "WSFS_INIT": "1", "JUPYTER_TOKEN": "tok-123",
            "CUDA_VISIBLE_DEVICES": "0", "AWS_ACCESS_KEY_ID": "AKIDCHECK",
            "AWS_SECRET_ACCESS_KEY": "secret-check-image"}
NOTEBOOK = r'''
id -u >/tmp/ci-uid; id -g >/tmp/ci-gid; env >/tmp/ci-env
head -c 3000000 /dev/urandom >"$WSFS_MOUNTPOINT/big.bin"
echo "hello from the notebook" >"$WSFS_MOUNTPOINT/hello.txt"
touch "$WSFS_DATA_DIR/scratch"
touch /tmp/ci-ready
exec sleep 600
'''


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def build(steps: list[tuple[str, str]]) -> tuple[dict[str, str], list[str], list[str]]:
    """Run the build steps here; return the image's ENV, ENTRYPOINT and CMD."""
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, rest in steps:
        if keyword == "COPY":
            src, dst = shlex.split(rest)
            assert src == ".", f"only `COPY . DIR` is emulated, not {rest!r}"
            shutil.copytree(CONTEXT, dst, dirs_exist_ok=True, symlinks=True,
                            ignore=shutil.ignore_patterns(".git"))
        elif keyword == "RUN":
            parts = [p for p in rest.split("&&") if "pip install" not in p]
            if parts:
                print(f"check-image: RUN {' && '.join(p.strip() for p in parts)}", flush=True)
                subprocess.run(["bash", "-euc", " && ".join(parts)], check=True,
                               env={**os.environ, **env})
        elif keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif keyword == "CMD":
            cmd = json.loads(rest)
    return env, entrypoint, cmd


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"check-image: FAILED: the notebook never started (exit {proc.poll()})")
        time.sleep(0.2)


def check(what: str, ok: bool) -> None:
    print(f"check-image: {'ok' if ok else 'FAILED'}: {what}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    if "--throwaway" not in sys.argv[1:]:
        sys.exit("check-image: this installs packages and a user and writes to /src, /workspace "
                 "and /data: run it in a throwaway machine with --throwaway (see its docstring)")
    image_env, entrypoint, cmd = build(instructions(HERE / "Dockerfile"))
    check(f"the CMD is the notebook itself ({shlex.join(cmd)})", cmd[:1] == ["jupyter"]
          and "--reset-env" not in cmd)
    user = pwd.getpwnam(image_env["WSFS_USER"])
    STORE.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **image_env, **PLATFORM}
    proc = subprocess.Popen([*entrypoint, "bash", "-c", NOTEBOOK], env=env)
    wait_for(Path("/tmp/ci-ready"), proc)
    child = dict(ln.split("=", 1) for ln in Path("/tmp/ci-env").read_text().splitlines()
                 if "=" in ln)
    ids = (int(Path("/tmp/ci-uid").read_text()), int(Path("/tmp/ci-gid").read_text()))
    check(f"the notebook runs as {user.pw_name} {ids}", ids == (user.pw_uid, user.pw_gid))
    check("HOME, USER and the platform's variables reach it",
          child.get("HOME") == user.pw_dir and child.get("USER") == user.pw_name
          and child.get("JUPYTER_TOKEN") == PLATFORM["JUPYTER_TOKEN"]
          and child.get("CUDA_VISIBLE_DEVICES") == "0" and child.get("PATH") == env["PATH"])
    check("the S3 keys do not", not any(k.startswith("AWS_") for k in child))
    mnt, data = Path(image_env["WSFS_MOUNTPOINT"]), Path(image_env["WSFS_DATA_DIR"])
    check("it owns the new workspace and the data dir",
          mnt.stat().st_uid == user.pw_uid == data.stat().st_uid)
    digest = hashlib.sha256((mnt / "big.bin").read_bytes()).hexdigest()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    check(f"SIGTERM: the entrypoint exited {code} after {time.monotonic() - start:.1f} s",
          code == 0)
    fresh = Path("/mnt/check-image")
    fresh.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in os.environ.items() if not k.startswith("WSFS_")}
    subprocess.run(["wsfs", "mount", PLATFORM["WSFS_STORE"], str(fresh), "--cache-dir",
                    "/tmp/check-image-fresh-cache"], check=True, env=plain)
    try:
        check("an empty cache reads every byte back",
              hashlib.sha256((fresh / "big.bin").read_bytes()).hexdigest() == digest
              and (fresh / "hello.txt").read_text() == "hello from the notebook\n"
              and fresh.stat().st_uid == user.pw_uid)
    finally:
        subprocess.run(["wsfs", "unmount", str(fresh)], check=True, env=plain)
    print("check-image: the example image builds and starts (without a container engine)")


if __name__ == "__main__":
    main()
