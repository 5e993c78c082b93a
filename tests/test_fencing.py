"""No split brain: the store fences a paused or cut-off writer (issue 19), Jepsen-style.

Two "hosts" on one machine: each daemon runs in its own UTS namespace (`unshare -u`), so the
lease names a different host for each, and neither can tell whether the other still runs (only
the lease's expiry says so, as between real machines). One store: the embedded file:// store
or moto (which honours If-None-Match and If-Match), the fault proxy in front of host a where
a request must be held or the store cut off. WSFS_LEASE_TTL is 3 s.

Each scenario: writer A publishes, then loses the workspace without knowing (paused with
SIGSTOP past its lease, or cut off from the store, or with a renewal or a HEAD upload held in
the network past its lease); B takes over, writes and publishes; then A comes back. What must
hold: B's checkpoints are never overwritten (the store's HEAD and manifests as B left them),
B keeps the lease and keeps publishing, A answers writes with EROFS once it knows (reads go on),
and A's unmount does not publish. The short forms run in the default suite; `slow` runs each
scenario many times (WSFS_FENCING_ROUNDS, default 50).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, s3_workspace, wait_for
from faultproxy import FaultProxy
from s3servers import S3Server

from wsfs.lease import read_holder
from wsfs.meta import checkpoint as ckpt
from wsfs.store import LocalStore, ObjectStore, S3Store

TTL = 3.0
ROUNDS = int(os.environ.get("WSFS_FENCING_ROUNDS", "50"))


class Host(Workspace):
    """A workspace client whose daemon runs on host `name` (its own UTS namespace)."""

    def __init__(self, name: str, root: Path, store_url: str, env: dict[str, str]) -> None:
        super().__init__(root, store_url, {**env, "WSFS_LEASE_TTL": str(TTL)})
        self.name = name

    def wsfs(self, *args: str, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        if args[:1] != ("mount",):
            return super().wsfs(*args, check=check, timeout=timeout)
        env = {**os.environ, **self.env}
        r = subprocess.run(["unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"',
                            self.name, *WSFS, *args],
                           capture_output=True, text=True, env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"wsfs {' '.join(args)} on {self.name} exited "
                                 f"{r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r


def published(store: ObjectStore) -> dict[int, int]:
    """Every manifest in the store: seq -> created_ns."""
    out = {}
    for key, _ in store.list(ckpt.MANIFEST_PREFIX):
        m = ckpt.Manifest.decode(store.get(key))
        out[m.seq] = m.created_ns
    return out


def head(store: ObjectStore) -> dict[str, object]:
    return dict(json.loads(store.get(ckpt.HEAD_KEY)))


def wait_lease_expired(store: ObjectStore) -> None:
    holder = read_holder(store)
    assert holder is not None
    left = holder.expires - time.time()
    assert left < 2 * TTL
    time.sleep(max(0.0, left) + 0.3)


def write_or_erofs(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
    except OSError as e:
        assert e.errno == errno.EROFS, e
        return False
    return True


class Pair:
    """Hosts a and b on one store; `a_via` is host a's endpoint (a proxy) on S3."""

    def __init__(self, tmp_path: Path, server: S3Server | None,
                 proxy: FaultProxy | None) -> None:
        if server is None:
            url, env = f"file://{tmp_path / 'store'}", {}
            self.store: ObjectStore = LocalStore(tmp_path / "store")
        else:
            base = s3_workspace(server, tmp_path / "init")
            url, env = base.store_url, dict(base.env)
            bucket, prefix = url.removeprefix("s3://").split("/", 1)
            self.store = S3Store(bucket, prefix, endpoint_url=server.endpoint_url,
                                 path_style=True)
        self.a = Host("host-a", tmp_path / "a", url, env)
        self.b = Host("host-b", tmp_path / "b", url, env)
        if proxy is not None:
            self.a.env["AWS_ENDPOINT_URL"] = proxy.url
        self.proxy = proxy
        self.stopped: int | None = None
        self.b.init()

    def pause_a(self) -> None:
        self.stopped = self.a.daemon_pid()
        assert self.stopped is not None
        os.kill(self.stopped, signal.SIGSTOP)

    def resume_a(self) -> None:
        if self.stopped is not None:
            os.kill(self.stopped, signal.SIGCONT)
            self.stopped = None

    def teardown(self) -> None:
        self.resume_a()
        if self.proxy is not None:
            self.proxy.pass_through()
        self.a.teardown()
        self.b.teardown()


@pytest.fixture(params=["file", "moto"])
def pair(request: pytest.FixtureRequest, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    server = None
    proxy = None
    if request.param == "moto":
        server = request.getfixturevalue("moto_server")
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        proxy = FaultProxy(server.endpoint_url).start()
    p = Pair(tmp_path, server, proxy)
    yield p
    p.teardown()
    if proxy is not None:
        proxy.stop()


def takeover(p: Pair, lose_a: Callable[[], None], give_back: Callable[[], None]) -> None:
    """A publishes, loses the workspace (`lose_a`), B takes over and publishes, A comes
    back (`give_back`): check everything the module docstring promises."""
    a, b = p.a, p.b
    a.mount()
    (a.mnt / "a1").write_text("a1")
    a.wsfs("sync", str(a.mnt))
    lose_a()
    wait_lease_expired(p.store)
    b.mount(cache_dir=b.fresh_cache())
    (b.mnt / "b1").write_text("b1")
    b.wsfs("sync", str(b.mnt))
    b_id = b.status()["lease"]["mount_id"]
    mine = published(p.store)
    # A write issued on A before it is back: it may be accepted before A learns.
    outcome: list[bool] = []
    writer = threading.Thread(
        target=lambda: outcome.append(write_or_erofs(a.mnt / "a2", "a2")), daemon=True)
    writer.start()
    time.sleep(0.2)
    give_back()
    writer.join(timeout=60)
    assert outcome, "the write on the fenced mount never returned"
    wait_for("A fenced", lambda: bool(a.status().get("fenced")), timeout=30)
    assert not write_or_erofs(a.mnt / "a3", "a3"), "a fenced mount took a new write"
    assert (a.mnt / "a1").read_text() == "a1"  # reads keep working
    (b.mnt / "b2").write_text("b2")
    b.wsfs("sync", str(b.mnt))  # B still holds the workspace and publishes
    now = published(p.store)
    for seq, created in mine.items():
        assert now.get(seq, created) == created, f"checkpoint {seq} was overwritten"
    assert head(p.store)["mount_id"] == b_id
    holder = read_holder(p.store)
    assert holder is not None and holder.mount_id == b_id
    a.allowed_log_errors.append("this mount is fenced")
    r = a.wsfs("unmount", str(a.mnt), check=False, timeout=120)
    assert r.returncode in (0, 7), r.stderr
    assert head(p.store)["mount_id"] == b_id
    b.unmount()
    mnt = b.mount(cache_dir=b.fresh_cache())
    assert (mnt / "b1").read_text() == "b1" and (mnt / "b2").read_text() == "b2"
    assert not (mnt / "a3").exists()
    b.unmount()


def paused(p: Pair) -> None:
    takeover(p, p.pause_a, p.resume_a)


def cut_off(p: Pair) -> None:
    """Host a's store connection is cut (every connection refused) instead of a pause."""
    assert p.proxy is not None
    takeover(p, lambda: p.proxy.outage(3600),  # type: ignore[union-attr]
             p.proxy.pass_through)


def held_request(p: Pair, path: str) -> None:
    """One of A's PUTs (`path`: its lease renewal, or HEAD in its flush) is held in the
    network while A is paused past its lease, and lands after B took over."""
    assert p.proxy is not None
    proxy = p.proxy

    def lose() -> None:
        proxy.delay(3600, methods=["PUT"], path=path)
        if path.endswith("HEAD"):
            (p.a.mnt / "in-flight").write_text("x")
            threading.Thread(target=lambda: p.a.wsfs("sync", str(p.a.mnt), check=False),
                             daemon=True).start()
        wait_for("A's PUT held", lambda: proxy.stats["delay"] > 0, timeout=30)
        p.pause_a()

    def back() -> None:
        proxy.pass_through()  # the held PUT lands now, after the takeover
        wait_for("the held PUT forwarded", lambda: proxy.stats["forwarded"] > 0, timeout=30)
        time.sleep(0.5)
        p.resume_a()

    takeover(p, lose, back)


def test_a_paused_writer_is_fenced(pair: Pair) -> None:
    paused(pair)


def test_a_cut_off_writer_is_fenced(pair: Pair) -> None:
    if pair.proxy is None:
        pytest.skip("the file:// store cannot be cut off")
    cut_off(pair)


def test_a_renewal_landing_after_a_takeover_is_refused(pair: Pair) -> None:
    if pair.proxy is None:
        pytest.skip("no network to hold a request in")
    held_request(pair, "/lease")


def test_a_head_upload_landing_after_a_takeover_is_refused(pair: Pair) -> None:
    if pair.proxy is None:
        pytest.skip("no network to hold a request in")
    held_request(pair, "meta/HEAD")


SCENARIOS: dict[str, Callable[[Pair], None]] = {
    "paused": paused, "cut_off": cut_off,
    "renewal": lambda p: held_request(p, "/lease"),
    "head": lambda p: held_request(p, "meta/HEAD"),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("kind", ["file", "moto"])
def test_fencing_many_times(scenario: str, kind: str, tmp_path: Path,
                            request: pytest.FixtureRequest,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "file" and scenario != "paused":
        pytest.skip("needs the network between host a and the store")
    for i in range(ROUNDS):
        server = proxy = None
        if kind == "moto":
            server = request.getfixturevalue("moto_server")
            for k, v in server.env().items():
                monkeypatch.setenv(k, v)
            proxy = FaultProxy(server.endpoint_url).start()
        p = Pair(tmp_path / str(i), server, proxy)
        try:
            SCENARIOS[scenario](p)
        finally:
            p.teardown()
            if proxy is not None:
                proxy.stop()
