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
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WSFS, Workspace, s3_workspace, wait_for
from faultproxy import FaultProxy
from s3servers import S3Server
from test_packs import to_format_3

from wsfs.daemon.lease import read_holder
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


def takeover(p: Pair, lose_a: Callable[[], None], give_back: Callable[[], None],
             accepted: dict[str, tuple[str, int, int]] | None = None,
             force: bool = False, skew: bool = False) -> None:
    """A publishes, loses the workspace (`lose_a`), B takes over and publishes, A comes
    back (`give_back`): check everything the module docstring promises. `accepted`: files
    (name -> content, mode, mtime) A accepted that the store must never have got from it,
    which the next mount from A's cache dir brings back as conflict copies."""
    a, b = p.a, p.b
    accepted = {} if accepted is None else accepted
    a.mount()
    (a.mnt / "a1").write_text("a1")
    a.wsfs("sync", str(a.mnt))
    lose_a()
    if force:  # A is alive (or thought to be): B takes over at once
        b.mount("--force", cache_dir=b.fresh_cache())
    elif skew:  # B's clock is 5 minutes ahead: A's live lease looks expired to it
        b.env["WSFS_CLOCK_SKEW"] = "300"
        b.mount(cache_dir=b.fresh_cache())
        del b.env["WSFS_CLOCK_SKEW"]
    else:
        wait_lease_expired(p.store)
        b.mount(cache_dir=b.fresh_cache())
    for name in ("b1", "b1b"):  # two checkpoints: a late HEAD of A's would go back one
        (b.mnt / name).write_text(name)
        b.wsfs("sync", str(b.mnt))
    b_id = b.status()["lease"]["mount_id"]
    mine, b_head = published(p.store), head(p.store)
    # A write issued on A before it is back (it blocks in the kernel while A is stopped; the
    # pause lets it get there): it may be accepted before A learns.
    outcome: list[bool] = []
    writer = threading.Thread(
        target=lambda: outcome.append(write_or_erofs(a.mnt / "a2", "a2")), daemon=True)
    writer.start()
    time.sleep(0.2)
    give_back()
    writer.join(timeout=60)
    assert outcome, "the write on the fenced mount never returned"
    if outcome[0]:
        accepted["a2"] = ("a2", *mode_and_mtime(a.mnt / "a2"))
    # The store first: whatever of A's landed late must not have undone B's work.
    assert head(p.store) == b_head, "a late write of the old holder replaced meta/HEAD"
    (b.mnt / "b2").write_text("b2")
    b.wsfs("sync", str(b.mnt))  # B still holds the workspace and publishes
    now = published(p.store)
    for seq, created in mine.items():
        assert now.get(seq, created) == created, f"checkpoint {seq} was overwritten"
    assert head(p.store)["mount_id"] == b_id
    holder = read_holder(p.store)
    assert holder is not None and holder.mount_id == b_id
    # A knows by now, or at its next renewal: no new writes, reads go on.
    wait_for("A fenced", lambda: bool(a.status().get("fenced")), timeout=30)
    assert not write_or_erofs(a.mnt / "a3", "a3"), "a fenced mount took a new write"
    assert (a.mnt / "a1").read_text() == "a1"
    a.allowed_log_errors.append("this mount is fenced")
    r = a.wsfs("unmount", str(a.mnt), check=False, timeout=120)
    assert r.returncode in (0, 7), r.stderr
    assert head(p.store)["mount_id"] == b_id
    b.unmount()
    mnt = b.mount(cache_dir=b.fresh_cache())
    assert [(mnt / n).read_text() for n in ("b1", "b1b", "b2")] == ["b1", "b1b", "b2"]
    assert not (mnt / "a3").exists()
    for name in accepted:
        assert not (mnt / name).exists(), f"{name} from the fenced mount reached the store"
    b.unmount()
    # The next mount from A's cache dir sets it aside and brings back what A accepted.
    a.mount()
    log = a.cache.log
    wait_for("the conflict export", lambda: log.exists() and (
        "files the store never got" in log.read_text()
        or "holds nothing the store lacks" in log.read_text()), timeout=60)
    copies = list((a.mnt / ".wsfs-conflicts").glob("host-a-*"))
    assert len(copies) == (1 if accepted else 0), copies
    for name, (text, mode, mtime) in accepted.items():
        assert (copies[0] / name).read_text() == text
        assert mode_and_mtime(copies[0] / name) == (mode, mtime)
    if copies:
        assert not (copies[0] / "a1").exists()  # published before: not a conflict
        wait_for("the export in the status", lambda: bool(a.status().get("conflicts")))
        assert a.status()["conflicts"][0]["files"] == len(accepted)
        assert "conflicts:" in a.wsfs("status", str(a.mnt)).stdout
    assert (a.mnt / "b2").read_text() == "b2"
    a.unmount()


def mode_and_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mode & 0o7777, st.st_mtime_ns


def paused(p: Pair) -> None:
    takeover(p, p.pause_a, p.resume_a)


def cut_off(p: Pair) -> None:
    """Host a's store connection is cut (every connection refused) instead of a pause."""
    assert p.proxy is not None
    takeover(p, lambda: p.proxy.outage(3600),  # type: ignore[union-attr]
             p.proxy.pass_through)


def held_request(p: Pair, path: str, force: bool = False, skew: bool = False) -> None:
    """One of A's PUTs (`path`: its lease renewal, or HEAD in its flush) is held in the
    network while A is paused past its lease, and lands after B took over. With `force`,
    A is not paused: B takes over its live lease with --force while the PUT is held."""
    assert p.proxy is not None
    proxy = p.proxy

    def lose() -> None:
        proxy.delay(3600, methods=["PUT"], path=path)
        if path.endswith("HEAD"):
            f = p.a.mnt / "in-flight"
            f.write_text("accepted, then fenced while publishing")
            f.chmod(0o640)
            os.utime(f, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
            accepted["in-flight"] = ("accepted, then fenced while publishing", 0o640,
                                     1_600_000_000_123_456_789)
            threading.Thread(target=lambda: p.a.wsfs("sync", str(p.a.mnt), check=False),
                             daemon=True).start()
        wait_for("A's PUT held", lambda: proxy.stats["delay"] > 0, timeout=30)
        if not (force or skew):
            p.pause_a()

    def back() -> None:
        proxy.pass_through()  # the held PUT lands now, after the takeover
        wait_for("the held PUT forwarded", lambda: proxy.stats["forwarded"] > 0, timeout=30)
        time.sleep(0.5)
        p.resume_a()

    accepted: dict[str, tuple[str, int, int]] = {}
    takeover(p, lose, back, accepted, force=force, skew=skew)


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


def test_force_on_a_live_holder_is_safe(pair: Pair) -> None:
    """--force while the holder runs and its publication is in flight (past its lease
    check, HEAD upload held): the old holder's HEAD is refused, the new one's work stays."""
    if pair.proxy is None:
        pytest.skip("no network to hold a request in")
    held_request(pair, "meta/HEAD", force=True)


def test_clocks_minutes_apart_change_nothing(pair: Pair) -> None:
    """Host b's clock runs 5 minutes ahead, so A's live lease looks expired to it and B takes
    the workspace over from a running A, mid-publication: the store fences A all the same."""
    if pair.proxy is None:
        pytest.skip("no network to hold a request in")
    held_request(pair, "meta/HEAD", skew=True)


SCENARIOS: dict[str, Callable[[Pair], None]] = {
    "paused": paused, "cut_off": cut_off,
    "renewal": lambda p: held_request(p, "/lease"),
    "head": lambda p: held_request(p, "meta/HEAD"),
    "force": lambda p: held_request(p, "meta/HEAD", force=True),
    "skew": lambda p: held_request(p, "meta/HEAD", skew=True),
}


@pytest.mark.slow
@pytest.mark.timeout(ROUNDS * 90)
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
            print(f"{kind} {scenario}: round {i + 1} of {ROUNDS} passed", flush=True)
        finally:
            p.teardown()
            if proxy is not None:
                proxy.stop()


def test_recover_by_hand_what_a_forced_out_mount_never_published(tmp_path: Path) -> None:
    """`wsfs recover CACHE_DIR --into DIR`: a mount forced out before it published anything
    since its start (its cache dir holds no published copy: what changed after its fetch
    counts) gives back its files, trees, symlinks, modes and times, into any directory."""
    url = f"file://{tmp_path / 'store'}"
    a = Workspace(tmp_path / "a", url, env={"WSFS_LEASE_TTL": "60"})
    b = Workspace(tmp_path / "b", url, env={"WSFS_LEASE_TTL": "60"})
    a.init()
    try:
        mnt = a.mount()
        (mnt / "old").write_text("published")
        a.wsfs("sync", str(mnt))
        a.unmount()
        # A fresh cache dir, fetched: from here on it publishes only at its unmount.
        mnt = a.mount(flush_delay=3600, cache_dir=a.fresh_cache())
        assert not a.cache.published.exists()
        big = os.urandom(3 * (1 << 20) + 12345)
        (mnt / "d" / "sub").mkdir(parents=True)
        (mnt / "d" / "sub" / "big").write_bytes(big)
        (mnt / "d" / "empty").mkdir(mode=0o700)
        (mnt / "d" / "link").symlink_to("sub/big")
        (mnt / "ro").write_text("read-only")
        (mnt / "ro").chmod(0o400)
        os.utime(mnt / "ro", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_001))
        b.mount("--force")
        (b.mnt / "from-b").write_text("b")
        b.unmount()
        a.allowed_log_errors.append("this mount is fenced")
        r = a.wsfs("unmount", str(mnt), check=False, timeout=120)
        assert r.returncode == 7, r.stderr
        out = tmp_path / "out"
        r = a.wsfs("recover", str(a.cache_dir), "--into", str(out))
        assert "recovered" in r.stdout, r.stdout
        assert (out / "d" / "sub" / "big").read_bytes() == big
        assert (out / "d" / "empty").is_dir()
        assert (out / "d" / "empty").stat().st_mode & 0o777 == 0o700
        assert os.readlink(out / "d" / "link") == "sub/big"
        assert (out / "ro").read_text() == "read-only"
        assert mode_and_mtime(out / "ro") == (0o400, 1_500_000_000_000_000_001)
        assert not (out / "old").exists()  # the store has it
        assert not (out / "from-b").exists()
    finally:
        a.teardown()
        b.teardown()


@pytest.mark.parametrize("kind", ["moto", "rclone"])
def test_a_store_that_ignores_the_conditions_says_so(kind: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    """rclone serve s3 ignores If-None-Match and If-Match: one warning at mount, and `wsfs
    status` says fencing is off; moto honours them and nothing is said."""
    server: S3Server = request.getfixturevalue(f"{kind}_server")
    w = s3_workspace(server, tmp_path)
    try:
        w.init()
        w.mount()
        wait_for("the status", lambda: "fencing" in w.status())
        assert w.status()["fencing"] is (kind == "moto")
        text = w.wsfs("status", str(w.mnt)).stdout
        assert ("fencing:     off" in text) is (kind == "rclone"), text
        warnings = [ln for ln in w.cache.log.read_text().splitlines()
                    if "cannot fence a paused or cut-off writer" in ln]
        assert len(warnings) == (1 if kind == "rclone" else 0), warnings
        w.unmount()
    finally:
        w.teardown()


def test_recover_from_a_cache_dir_of_format_3(tmp_path: Path) -> None:
    """A cache dir set aside by a mount of format 3 (each timestamp one column), its copy of
    what it published too: what it never published comes back, times exact, and only that."""
    url = f"file://{tmp_path / 'store'}"
    a = Workspace(tmp_path / "a", url, env={"WSFS_LEASE_TTL": "60"})
    b = Workspace(tmp_path / "b", url, env={"WSFS_LEASE_TTL": "60"})
    a.init()
    try:
        mnt = a.mount(flush_delay=3600)
        (mnt / "old").write_text("published")
        a.wsfs("sync", str(mnt))
        assert a.cache.published.exists()
        (mnt / "new").write_text("never published")
        os.utime(mnt / "new", ns=(-1, 1_500_000_000_000_000_001))
        b.mount("--force")
        b.unmount()
        a.allowed_log_errors.append("this mount is fenced")
        r = a.wsfs("unmount", str(mnt), check=False, timeout=120)
        assert r.returncode == 7, r.stderr
        for db in (a.cache.meta_db, a.cache.published):
            conn = sqlite3.connect(db)
            to_format_3(conn)
            conn.commit()
            conn.close()
        out = tmp_path / "out"
        r = a.wsfs("recover", str(a.cache_dir), "--into", str(out))
        assert "recovered" in r.stdout, r.stdout
        assert (out / "new").read_text() == "never published"
        assert mode_and_mtime(out / "new")[1] == 1_500_000_000_000_000_001
        assert not (out / "old").exists()  # the store has it
    finally:
        a.teardown()
        b.teardown()
