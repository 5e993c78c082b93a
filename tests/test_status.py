"""`wsfs status`, `wsfs sync`, `--metrics` and the unmount progress, through real mounts."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, wait_for, wait_pid_gone
from faultproxy import FaultProxy

from wsfs.errors import DaemonGoneError, MountError
from wsfs.runtime import is_mountpoint

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_json(ws: Workspace, *args: str) -> object:
    return json.loads(ws.wsfs("status", *args, "--json").stdout)


def test_status_shows_unsaved_data_and_sync_publishes_it(ws: Workspace) -> None:
    """What status reports is true, and after `wsfs sync` a crash loses nothing."""
    mnt = ws.mount("--cache-size", "64M", flush_delay=300)
    big = os.urandom(2 * MiB + 123)
    (mnt / "big.bin").write_bytes(big)
    (mnt / "note.txt").write_text("not yet saved\n")
    os.sync()  # the kernel hands its cached pages to the daemon
    # status.json is rewritten every half second: wait for the snapshot after the writes
    wait_for("the dirty bytes in status",
             lambda: ws.status()["dirty_bytes"] >= len(big),
             timeout=10)
    st = status_json(ws, str(mnt))
    assert isinstance(st, dict)
    assert st["state"] == "serving" and st["alive"] and not st["stale"]
    assert st["dirty_bytes"] >= len(big) and st["dirty_blocks"] >= 3
    assert st["store"] == ws.store_url
    assert st["cache_limit"] == 64 * MiB
    assert st["lease"]["pid"] == st["pid"] == ws.daemon_pid()
    before = st["checkpoint"]
    human = ws.wsfs("status", str(mnt)).stdout
    assert "unsaved:" in human and "2.0 MiB" in human and ws.store_url in human

    result = ws.wsfs("sync", str(mnt), "--timeout", "60")
    assert result.returncode == 0
    st = status_json(ws, str(mnt))
    assert isinstance(st, dict)
    assert st["dirty_bytes"] == 0 and st["dirty_blocks"] == 0
    assert st["checkpoint"] > before
    assert st["uploaded_bytes"] >= len(big)
    assert st["checkpoint_age"] < 30

    # a crash right after the sync: a fresh machine sees everything that was synced
    ws.kill()
    assert not is_mountpoint(mnt)
    ws.fresh_cache()
    mnt = ws.mount()
    assert (mnt / "big.bin").read_bytes() == big
    assert (mnt / "note.txt").read_text() == "not yet saved\n"
    ws.unmount()


def test_status_lists_mounts_and_refuses_non_mounts(ws: Workspace, tmp_path: Path) -> None:
    empty = ws.wsfs("status").stdout
    assert str(ws.mnt) not in empty
    mnt = ws.mount()
    rows = status_json(ws)
    assert isinstance(rows, list)
    mine = [r for r in rows if r["mountpoint"] == str(mnt)]
    assert len(mine) == 1 and mine[0]["state"] == "serving"
    assert str(mnt) in ws.wsfs("status").stdout
    other = tmp_path / "not-a-mount"
    other.mkdir()
    for verb in ("status", "sync"):
        r = ws.wsfs(verb, str(other), check=False)
        assert r.returncode == 6, r.stderr
        assert "not a wsfs mount" in r.stderr and "Traceback" not in r.stderr
    ws.unmount()


def test_a_mountpoint_whose_path_holds_spaces(ws: Workspace) -> None:
    """/proc/self/mounts writes a space as \\040: every command must still know the mount."""
    ws.mnt = ws.root / "my work space"
    ws.mnt.mkdir()
    mnt = ws.mount()
    (mnt / "kept").write_text("kept")
    r = ws.wsfs("mount", ws.store_url, str(mnt), "--cache-dir", str(ws.root / "other"),
                check=False)
    assert r.returncode != 0 and "already mounted" in r.stderr, r.stderr
    st = status_json(ws, str(mnt))
    assert isinstance(st, dict) and st["state"] == "serving"
    rows = status_json(ws)
    assert isinstance(rows, list) and [r["state"] for r in rows
                                       if r["mountpoint"] == str(mnt)] == ["serving"]
    ws.wsfs("sync", str(mnt))
    ws.unmount()
    assert not (mnt / "kept").exists()
    ws.fresh_cache()
    assert (ws.mount() / "kept").read_text() == "kept"
    ws.unmount()


def test_a_mountpoint_named_through_a_symlink_or_dot_dot(ws: Workspace) -> None:
    """The kernel records a mountpoint resolved; the commands must find the mount under any
    name of it: a /workspace that is a symlink (a container image may make it one) was not
    recognised as mounted, so `wsfs unmount` refused it and `wsfs run` at SIGTERM waited for
    a daemon nobody had asked to stop."""
    link = ws.root / "workspace"
    link.symlink_to(ws.mnt)  # ws.mnt, the real directory, is what teardown checks
    ws.wsfs("mount", ws.store_url, str(link), "--cache-dir", str(ws.cache_dir))
    assert is_mountpoint(ws.mnt)
    (link / "kept").write_text("kept")
    r = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-dir", str(ws.root / "other"),
                check=False)
    assert r.returncode != 0 and "already mounted" in r.stderr, r.stderr
    st = status_json(ws, str(link))
    assert isinstance(st, dict) and st["state"] == "serving"
    assert st["mountpoint"] == str(ws.mnt)
    ws.wsfs("sync", str(ws.mnt / ".." / "workspace"))
    ws.wsfs("unmount", str(link), timeout=300)  # flushes, unmounts, waits
    assert not is_mountpoint(ws.mnt)
    ws.fresh_cache()
    assert (ws.mount() / "kept").read_text() == "kept"
    ws.unmount()


def test_sync_with_nothing_to_do_and_repeated(mounted: Workspace) -> None:
    mnt = mounted.mnt
    for i in range(3):
        (mnt / f"f{i}").write_text(str(i))
        assert mounted.wsfs("sync", str(mnt)).returncode == 0
    assert mounted.wsfs("sync", str(mnt)).returncode == 0
    st = status_json(mounted, str(mnt))
    assert isinstance(st, dict) and st["dirty_bytes"] == 0 and st["syncs"] >= 4
    mounted.unmount()


def test_status_of_a_mount_whose_daemon_was_killed(ws: Workspace) -> None:
    """A daemon killed by SIGKILL leaves a dead mount ('Transport endpoint is not connected')
    and a status.json that says "serving": `wsfs status` said so too, with the lease
    "renewed 1s ago", and exited 0. It must say the mount is dead and how to recover, exit
    with its own code, and not be fooled by the dead daemon's pid running another process."""
    mnt = ws.mount(flush_delay=300)
    (mnt / "unsaved.txt").write_text("only in the cache dir\n")
    os.sync()
    wait_for("the dirty block in status",
             lambda: ws.status()["dirty_blocks"] == 1, timeout=10)
    pid = ws.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_pid_gone(pid)
    assert is_mountpoint(mnt)  # dead, still mounted: ENOTCONN
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # (the first access)

    def check_dead(mounted: bool) -> None:
        r = ws.wsfs("status", str(mnt), check=False)
        assert r.returncode == DaemonGoneError.exit_code, r
        assert f"{mnt}: dead" in r.stdout and f"pid {pid}" in r.stdout, r.stdout
        assert "serving" not in r.stdout and "renewed" not in r.stdout, r.stdout
        assert f"wsfs unmount {mnt}" in r.stdout and str(ws.cache_dir) in r.stdout
        assert r.stderr.startswith("wsfs: the daemon of") and "is gone" in r.stderr
        assert ("Transport endpoint is not connected" in r.stdout) == mounted
        r = ws.wsfs("status", str(mnt), "--json", check=False)
        assert r.returncode == DaemonGoneError.exit_code
        st = json.loads(r.stdout)
        assert st["state"] == "dead" and st["last_state"] == "serving" and not st["alive"]
        assert st["mounted"] == mounted and st["dirty_blocks"] == 1
        r = ws.wsfs("status", check=False)
        assert r.returncode == DaemonGoneError.exit_code
        assert [line.split()[1] for line in r.stdout.splitlines()
                if line.startswith(f"{mnt} ")] == ["dead"], r.stdout
        r = ws.wsfs("sync", str(mnt), check=False)
        assert r.returncode == DaemonGoneError.exit_code and "is gone" in r.stderr, r

    check_dead(mounted=True)
    # the dead daemon's pid, taken by another process (a container's pids are few)
    other = subprocess.Popen(["sleep", "300"])
    try:
        for path in (ws.cache.status, *(ws.root / "run").glob("*.json")):
            record = json.loads(path.read_text())
            record["pid"] = other.pid
            path.write_text(json.dumps(record))
        pid = other.pid
        check_dead(mounted=True)
    finally:
        other.kill()
        other.wait()

    # `wsfs unmount` recovers: unmounts the dead mount, forgets it, says what to do
    r = ws.wsfs("unmount", str(mnt), check=False)
    assert r.returncode == DaemonGoneError.exit_code, r
    assert "unmounted now" in r.stderr and str(ws.cache_dir) in r.stderr
    assert not is_mountpoint(mnt)
    r = ws.wsfs("status", str(mnt), check=False)
    assert r.returncode == MountError.exit_code and "not a wsfs mount" in r.stderr
    assert (ws.mount() / "unsaved.txt").read_text() == "only in the cache dir\n"
    ws.unmount()
    ws.fresh_cache()
    assert (ws.mount() / "unsaved.txt").read_text() == "only in the cache dir\n"
    ws.unmount()


def test_status_of_a_killed_daemon_whose_mount_was_cleared(ws: Workspace) -> None:
    mnt = ws.mount()
    pid = ws.daemon_pid()
    ws.kill()  # SIGKILL, then the dead mount cleared away
    assert not is_mountpoint(mnt)
    r = ws.wsfs("status", str(mnt), "--json", check=False)
    assert r.returncode == DaemonGoneError.exit_code, r
    st = json.loads(r.stdout)
    assert st["state"] == "dead" and st["pid"] == pid and not st["mounted"]
    r = ws.wsfs("status", str(mnt), check=False)
    assert "mount:       gone already" in r.stdout, r.stdout
    r = ws.wsfs("unmount", str(mnt), check=False)
    assert r.returncode == DaemonGoneError.exit_code and "unmounted now" in r.stderr, r
    assert str(mnt) not in ws.wsfs("status").stdout


def scrape(port: int, path: str = "/metrics") -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            values[name_labels.split("{")[0]] = float(value)
    return values


def test_metrics_endpoint(ws: Workspace) -> None:
    port = free_port()
    mnt = ws.mount("--metrics", f"127.0.0.1:{port}", flush_delay=300)
    data = os.urandom(MiB)
    (mnt / "m.bin").write_bytes(data)
    os.sync()
    m = scrape(port)
    assert m["wsfs_up"] == 1
    assert m["wsfs_dirty_bytes"] >= MiB and m["wsfs_dirty_blocks"] >= 1
    for name in ("wsfs_uploaded_bytes_total", "wsfs_retries_total", "wsfs_errors_total",
                 "wsfs_cache_hits_total", "wsfs_cache_misses_total", "wsfs_checkpoint_seq",
                 "wsfs_cache_limit_bytes", "wsfs_upload_rate_bytes"):
        assert name in m, name
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
        raise AssertionError("expected a 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    ws.wsfs("sync", str(mnt))
    m = scrape(port)
    assert m["wsfs_dirty_bytes"] == 0 and m["wsfs_uploaded_bytes_total"] >= MiB
    assert 0 <= m["wsfs_checkpoint_age_seconds"] < 30

    # on a fresh cache a read misses the cache, and the port is free again after unmount
    ws.unmount()
    ws.fresh_cache()
    mnt = ws.mount("-o", f"metrics=127.0.0.1:{port}")
    assert (mnt / "m.bin").read_bytes() == data
    m = scrape(port)
    assert m["wsfs_cache_misses_total"] >= 1
    ws.unmount()


def families(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """A scrape parsed by prometheus_client: family name -> [(sample, labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, list[tuple[str, dict[str, str], float]]], name: str,
           **labels: str) -> float:
    """The value of one sample (by its full name and some of its labels), summed over the
    others: `sample(m, "wsfs_fuse_request_seconds_count", op="write")`."""
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    values = [v for n, lb, v in fams.get(family, []) if n == name
              and all(lb.get(k) == want for k, want in labels.items())]
    assert values, f"no sample {name}{labels} in the scrape"
    return sum(values)


def test_metrics_latency_histograms_and_process(ws: Workspace) -> None:
    """Histograms of the FUSE requests by operation and of the store requests by kind, whose
    counts grow with the work done; and the process's figures."""
    port = free_port()
    before_mount = time.time()
    mnt = ws.mount("--metrics", f"127.0.0.1:{port}", flush_delay=300)
    (mnt / "a.bin").write_bytes(os.urandom(MiB))
    m = families(port)
    fuse = {lb["op"] for n, lb, _ in m["wsfs_fuse_request_seconds"]}
    assert {"lookup", "create", "write", "getattr"} <= fuse, fuse
    buckets = [(float(lb["le"]), v) for n, lb, v in m["wsfs_fuse_request_seconds"]
               if n.endswith("_bucket") and lb["op"] == "write"]
    assert buckets[-1] == (float("inf"), sample(m, "wsfs_fuse_request_seconds_count",
                                                op="write"))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    kinds = {lb["kind"] for n, lb, _ in m["wsfs_store_request_seconds"]}
    assert {"get", "put", "put_if_absent", "delete", "list"} <= kinds, kinds
    writes = sample(m, "wsfs_fuse_request_seconds_count", op="write")
    puts = sample(m, "wsfs_store_request_seconds_count", kind="put")
    assert sample(m, "wsfs_store_errors_total") == 0
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds"):
        assert sample(m, name) > 0, name
    started = sample(m, "process_start_time_seconds")
    assert before_mount - 2 <= started <= time.time(), (before_mount, started)

    for i in range(20):
        (mnt / f"f{i}").write_bytes(os.urandom(4096))
        os.stat(mnt / f"f{i}")
    ws.wsfs("sync", str(mnt))
    m = families(port)
    assert sample(m, "wsfs_fuse_request_seconds_count", op="write") >= writes + 20
    assert sample(m, "wsfs_fuse_request_seconds_count", op="create") >= 21
    assert sample(m, "wsfs_fuse_request_seconds_sum", op="write") > 0
    assert sample(m, "wsfs_store_request_seconds_count", kind="put") > puts
    ws.unmount()


@pytest.mark.timeout(240)
def test_metrics_show_an_outage_from_mount_time(proxied: tuple[Workspace, FaultProxy]
                                                ) -> None:
    """A store that fails from the moment the mount is up: the failed requests are counted
    from the first, and the checkpoint age grows from the mount (it was absent: nothing had
    been published by this mount, so an alert on it never fired)."""
    ws, proxy = proxied
    port = free_port()
    mnt = ws.mount("--metrics", f"127.0.0.1:{port}", flush_delay=2)
    proxy.errors(1.0, "ServiceUnavailable")  # before the mount's first flush cycle
    mounted_at = time.time()
    data = os.urandom(300_000)
    (mnt / "during-the-outage.bin").write_bytes(data)
    wait_for("an upload retried", lambda: ws.status()["retries"] != 0, timeout=60)
    assert ws.status()["last_checkpoint_time"] is None  # none published since the mount
    m = families(port)
    assert sample(m, "wsfs_dirty_bytes") >= len(data)
    age = sample(m, "wsfs_checkpoint_age_seconds")
    assert age >= time.time() - mounted_at - 1, (age, time.time() - mounted_at)
    assert sample(m, "wsfs_store_errors_total", kind="put") >= 1
    assert sample(m, "wsfs_store_request_seconds_count", kind="put") >= 1
    wait_for("the checkpoint age to grow",
             lambda: sample(families(port), "wsfs_checkpoint_age_seconds") > age + 1,
             timeout=30)
    proxy.pass_through()
    wait_for("the backlog drained",
             lambda: sample(families(port), "wsfs_dirty_bytes") == 0, timeout=120)
    wait_for("a checkpoint published",
             lambda: sample(families(port), "wsfs_checkpoint_age_seconds") < 10, timeout=60)
    ws.unmount()
    ws.fresh_cache()
    assert (ws.mount() / "during-the-outage.bin").read_bytes() == data
    ws.unmount()


def test_metrics_port_in_use_fails_the_mount(ws: Workspace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-dir", str(ws.cache_dir),
                    "--metrics", f"127.0.0.1:{port}", check=False)
    assert r.returncode == 6, r.stderr
    assert "metrics" in r.stderr and "Traceback" not in r.stderr
    assert not is_mountpoint(ws.mnt)
    bad = ws.wsfs("mount", ws.store_url, str(ws.mnt), "--metrics", "nonsense", check=False)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def at_a_terminal(ws: Workspace, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run `wsfs ARGS` with its stderr on a pseudo-terminal; return its code and what it
    drew there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*WSFS, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env={**os.environ, **ws.env})
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_unmount_progress_at_a_terminal_and_in_the_log(ws: Workspace) -> None:
    """At a terminal `wsfs unmount` draws bytes left; in a pipe it is quiet; the log has it."""
    mnt = ws.mount(flush_delay=300)
    (mnt / "a.bin").write_bytes(os.urandom(3 * MiB))
    os.sync()
    code, text = at_a_terminal(ws, "unmount", str(mnt))
    assert code == 0, text
    assert "flushing" in text and "left" in text, text
    assert "\r" in text  # redrawn in place, then cleared
    assert not is_mountpoint(mnt)
    log = ws.cache.log.read_text()
    assert "progress what='flushing" in log and "every block is in" in log

    # not a terminal: nothing on stderr, still logged
    mnt = ws.mount(flush_delay=300)
    (mnt / "b.bin").write_bytes(os.urandom(MiB))
    r = ws.wsfs("unmount", str(mnt))
    assert r.stderr == "" and r.stdout == ""
    assert ws.cache.log.read_text().count("progress what='flushing") >= 2
    ws.check_log()


UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def countdown(text: str) -> tuple[list[tuple[int, int]], str]:
    """What a progress display drew: the (bytes, blocks) left of each frame, and the line it
    ended with. Sizes must be written in binary units with one decimal (or whole bytes)."""
    frames = [f.replace("\x1b[K", "").strip() for f in re.split(r"[\r\n]", text)]
    frames = [f for f in frames if f]
    left = []
    for frame in frames[:-1]:
        m = re.search(r": (\d+(?:\.\d)?) (B|KiB|MiB|GiB) left \((\d+) blocks\)", frame)
        assert m, f"not a progress line: {frame!r}"
        assert (m.group(2) == "B") == ("." not in m.group(1)), frame
        left.append((int(float(m.group(1)) * UNITS[m.group(2)]), int(m.group(3))))
    return left, frames[-1] if frames else ""


@pytest.mark.timeout(240)
def test_sync_and_unmount_count_down_and_end_with_a_closing_line(
        proxied: tuple[Workspace, FaultProxy]) -> None:
    """At a terminal, `wsfs sync` and `wsfs unmount` count the bytes and blocks left down,
    and end with one line that says all is in the store, how much went up and how long it
    took (the unmount cleared its line and ended with nothing). The uploads go through a
    proxy that carries 8 MiB/s: more packs than are uploaded at once, so the flush takes
    seconds and the countdown has steps."""
    ws, proxy = proxied
    mnt = ws.mount(flush_delay=300)
    blocks = 48
    for verb, done in (("sync", "synced"), ("unmount", "unmounted")):
        for i in range(blocks):
            (mnt / f"{verb}-{i}.bin").write_bytes(os.urandom(MiB))
        os.sync()
        wait_for("the backlog in status",  # before the command: the countdown starts full
                 lambda: ws.status()["dirty_blocks"] == blocks, timeout=20)
        proxy.throttle(8 * MiB)
        code, text = at_a_terminal(ws, verb, str(mnt))
        proxy.throttle(None)
        assert code == 0, text
        left, last = countdown(text)
        assert left and left[0] == (blocks * MiB, blocks), text
        assert left == sorted(left, reverse=True) and len(set(left)) >= 2, (verb, left)
        m = re.fullmatch(rf"wsfs: all in the store \((\d+\.\d) MiB uploaded, checkpoint #\d+\); "
                         rf"{done} {re.escape(str(mnt))} in (\d+\.\d) s", last)
        assert m, f"no closing line: {last!r}"
        assert float(m.group(1)) >= blocks, last
    assert not is_mountpoint(mnt)
    ws.check_log()


def test_json_log_format(ws: Workspace) -> None:
    ws.wsfs("--log-format", "json", "mount", ws.store_url, str(ws.mnt), "--cache-dir",
            str(ws.cache_dir))
    (ws.mnt / "x").write_text("x")
    ws.unmount()
    lines = ws.cache.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any(r["msg"].startswith("mounted ") and r["level"] == "info" for r in records)
    assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)


@pytest.mark.layers
def test_the_daemon_log_is_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wsfs.log lives on the cache disk: an outage logging for hours must not fill it."""
    import logging

    from wsfs import logs
    monkeypatch.setattr(logs, "LOG_MAX", 10_000)
    handler = logs.add_file_handler(tmp_path / "wsfs.log")
    try:
        for i in range(2_000):
            logging.getLogger("wsfs.test").warning("retrying an upload, attempt %d", i)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    logs_on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert logs_on_disk == ["wsfs.log", "wsfs.log.1", "wsfs.log.2", "wsfs.log.3"]
    assert sum((tmp_path / n).stat().st_size for n in logs_on_disk) < 5 * 10_000
