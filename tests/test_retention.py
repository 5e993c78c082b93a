"""Retention (wsfs/meta/retention.py, meta/history.py, sync/retain.py): which checkpoints stay,
and that nothing a kept checkpoint names ever leaves the store.

First the pure schedule over a simulated month with an injected clock (kept exactly what the
schedule says, however often thinning runs); then the daemon's side on the embedded store,
step by step: garbage and repacked packs stay while a kept checkpoint or a named snapshot
names them, and go once neither does.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_layers import BS, add_file, make
from test_repack import data_keys, unlink

from wsfs.blocks import object_key
from wsfs.meta import checkpoint as ckpt
from wsfs.meta import history as history_module
from wsfs.meta import retention
from wsfs.meta.history import History, create_snapshot, delete_snapshot, read_snapshots
from wsfs.meta.retention import BadSchedule, BadWhen, Schedule, kept, may_delete, resolve
from wsfs.meta.schema import referenced_objects
from wsfs.store import LocalStore, NoSuchKey, TransientStoreError
from wsfs.sync.repack import Repacker

pytestmark = pytest.mark.layers

MIN, HOUR, DAY = 60.0, 3600.0, 86400.0


def utc(_t: float) -> float:
    return 0.0


# -- the schedule -----------------------------------------------------------------------------

def test_schedule_syntax() -> None:
    default = Schedule.parse(retention.DEFAULT_KEEP)
    assert str(default) == "15m+48h:1h+30d:1d"
    assert [(r.within, r.every) for r in default.rules] == [
        (15 * MIN, None), (48 * HOUR, HOUR), (30 * DAY, DAY)]
    assert str(Schedule.parse("15m,48h:1h, 30d:1d")) == "15m+48h:1h+30d:1d"  # commas too
    assert str(Schedule.parse("0")) == "0" and Schedule.parse("0").rules == ()
    assert str(Schedule.parse("90m+forever:1w")) == "90m+forever:1w"
    for bad, words in [("", "empty term"), ("15m++1h", "empty term"), ("15", "not a duration"),
                       ("15x", "not a duration"), ("1h:0", "above zero"),
                       ("1d:forever", "above zero"), ("hourly=48", "not a duration")]:
        with pytest.raises(BadSchedule, match=words):
            Schedule.parse(bad)


def expected(history: dict[int, float], now: float) -> set[int]:
    """The default schedule by its definition, over the whole history: every checkpoint of
    the last 15 minutes, the newest of each clock hour of the last 48 hours and of each day
    of the last 30 days, and the newest of all (UTC here: the clock is injected)."""
    out = {max(history)} | {s for s, t in history.items() if now - t < 15 * MIN}
    for window, period in ((48 * HOUR, HOUR), (30 * DAY, DAY)):
        last: dict[int, int] = {}
        for s, t in history.items():
            if now - t < window:
                bucket = int(t // period)
                last[bucket] = max(last.get(bucket, s), s)
        out |= set(last.values())
    return out


def test_a_simulated_month_keeps_exactly_the_schedule() -> None:
    """A workspace used in bursts for six weeks, checkpoints seconds to hours apart, thinned
    every few publications as the daemon does: what is left at any moment is exactly what
    the schedule, applied once to the whole history, keeps. Thinning is monotonic: it never
    deletes a checkpoint it would want later."""
    rnd = random.Random(20)
    schedule = Schedule.parse(retention.DEFAULT_KEEP)
    start = 1_700_000_000.0
    now = start
    history: dict[int, float] = {}
    present: dict[int, float] = {}  # what the store still holds
    seq = 0
    checks = 0
    while now < start + 42 * DAY:
        # a burst of work (a checkpoint every 5-60 s), then a pause of minutes to a night
        for _ in range(rnd.randrange(1, 40)):
            now += rnd.uniform(5, 60)
            seq += 1
            history[seq] = present[seq] = now
            if seq % rnd.choice((1, 3, 20)) == 0:
                for gone in set(present) - kept(present, (), now, schedule, utc):
                    del present[gone]
        now += rnd.choice((rnd.uniform(60, 900), rnd.uniform(HOUR, 14 * HOUR)))
        for gone in set(present) - kept(present, (), now, schedule, utc):
            del present[gone]
        assert set(present) == expected(history, now), now - start
        checks += 1
    assert checks > 100 and seq > 2000
    # the shape: all of the last 15 minutes, then at most one per hour, then one per day
    ages = sorted(now - t for t in present.values())
    assert len([a for a in ages if a >= 48 * HOUR]) <= 30
    assert len([a for a in ages if 15 * MIN <= a < 48 * HOUR]) <= 48 + 1
    assert max(ages) < 30 * DAY + DAY


def test_a_named_snapshot_outlives_the_schedule() -> None:
    history = {1: 0.0, 2: 100.0, 3: 200.0}
    now = 10 * DAY
    assert kept(history, (), now, Schedule.parse("1h"), utc) == {3}
    assert kept(history, (1, 99), now, Schedule.parse("1h"), utc) == {1, 3}  # 99: not there
    assert kept({}, (), now, Schedule.parse("1h")) == set()


def test_periods_follow_the_local_clock() -> None:
    """Days start at local midnight: at UTC+2, 21:00 UTC is 23:00, 23:30 UTC the next day."""
    t = 1_700_006_400.0  # 00:00 UTC
    history = {1: t - 3 * HOUR, 2: t - 30 * MIN}  # 21:00 and 23:30 UTC
    schedule = Schedule.parse("30d:1d")
    assert kept(history, (), t + DAY, schedule, utc) == {2}  # one UTC day: its newest
    assert kept(history, (), t + DAY, schedule, lambda _t: 2 * HOUR) == {1, 2}


def test_checkpoints_of_an_older_version_are_kept_only_if_newest_or_named() -> None:
    """An older version deleted garbage right after the next checkpoint: its checkpoints but
    the newest may lack objects, so the schedule does not keep them (a name still does)."""
    now = time.time()
    old = ckpt.Manifest.decode(b'{"format": 1, "seq": 1, "created_ns": 1, "size": 0, '
                               b'"page_size": 65536, "pages": []}')
    assert not old.whole and ckpt.Manifest.decode(ckpt.Manifest(2, 2, 0, ()).encode()).whole
    history = History()
    for seq, whole in [(1, False), (2, False), (3, True)]:
        history.add(ckpt.Manifest(seq, int((now - 60 * (4 - seq)) * 1e9), 0, (), None, whole))
    hour = Schedule.parse("1h")
    assert history.keep(hour, (), now) == {3} and history.keep(hour, (1,), now) == {1, 3}
    del history.manifests[3]
    assert history.keep(hour, (), now) == {2}  # the newest is whole: its objects are there


def test_the_deletion_rule() -> None:
    kept_seqs = [3, 10, 11, 40]
    assert not may_delete(5, None, kept_seqs)  # still in the tree
    assert may_delete(4, 9, kept_seqs)  # named by 4..9: none kept
    assert not may_delete(4, 10, kept_seqs) and not may_delete(11, 12, kept_seqs)
    assert not may_delete(None, 3, kept_seqs)  # born unknown: from the first checkpoint on
    assert may_delete(41, 45, kept_seqs) and may_delete(12, 39, kept_seqs)
    assert may_delete(7, 6, kept_seqs)  # dropped before any checkpoint named it
    assert may_delete(*retention.UNNAMED, kept_seqs)
    assert not may_delete(0, 100, range(101))  # the checkpoints not listed yet: all of them


def test_when_names_a_kept_checkpoint() -> None:
    now = time.time()
    history = {4: now - 3 * HOUR, 9: now - 2 * HOUR, 12: now - 10 * MIN}
    names = {"before-upgrade": 9, "lost": 7}
    assert resolve("12", history, names, now) == 12 == resolve("#12", history, names, now)
    assert resolve("before-upgrade", history, names, now) == 9
    assert resolve("90m ago", history, names, now) == 9  # between two: the one before
    assert resolve("2h", history, names, now) == 9
    iso = retention.when_text(now - 150 * MIN)
    assert resolve(iso, history, names, now) == 4
    for bad, words in [("5", "checkpoint 5 is not kept"), ("nope", "no snapshot named 'nope'"),
                       ("lost", "missing from the store"), ("4h ago", "before the first kept"),
                       (retention.when_text(now + HOUR), "in the future"),
                       ("yesterday-ish!", "neither a checkpoint number")]:
        with pytest.raises(BadWhen, match=words):
            resolve(bad, history, names, now)
    with pytest.raises(BadWhen, match="not allowed"):
        retention.check_name("2024-05-01")  # would read as a time


# -- the daemon's side ------------------------------------------------------------------------

def fetched_objects(store: LocalStore, seq: int, tmp: Path) -> set[str]:
    """The data objects checkpoint `seq` names, fetched as an empty cache would."""
    db = tmp / f"c{seq}.db"
    trio.run(lambda: ckpt.fetch(store, seq, db, trio.CapacityLimiter(4)))
    conn = sqlite3.connect(db)
    try:
        return referenced_objects(conn)
    finally:
        conn.close()


def whole(store: LocalStore, seq: int, tmp: Path) -> bool:
    """Every data object checkpoint `seq` names is in the store."""
    have = {k.rsplit("/", 1)[-1] for k in data_keys(store)}
    return fetched_objects(store, seq, tmp) <= have


def test_garbage_stays_while_a_kept_checkpoint_or_a_name_holds_it(tmp_path: Path) -> None:
    store, meta, blocks, flusher = make(tmp_path, keep="15m")
    clock = [time.time()]
    flusher.retention.clock = lambda: clock[0]
    ino = add_file(meta, blocks, b"f", b"version one")
    trio.run(flusher.cycle)  # checkpoint 1 names version one
    one = meta.get_block(ino, 0)
    assert one is not None
    meta.begin()
    meta.set_block(ino, 0, blocks.create(b"version two"))
    meta.add_garbage_of([one] if blocks.discard(one.id) else [])
    meta.commit()
    trio.run(flusher.cycle)  # checkpoint 2: version two; version one is garbage
    assert object_key(one.id) in data_keys(store)  # checkpoint 1 is kept: 15 minutes
    assert create_snapshot(store, "before", 1) is not None
    assert create_snapshot(store, "before", 2) is None  # a name is given once
    clock[0] += 20 * MIN
    add_file(meta, blocks, b"g", b"later")
    trio.run(flusher.cycle)  # checkpoint 3, twenty minutes on: 1 and 2 are past the window
    assert ckpt.read_manifest(store, 1).seq == 1  # named: kept
    with pytest.raises(NoSuchKey):
        ckpt.read_manifest(store, 2)  # thinned
    assert object_key(one.id) in data_keys(store) and whole(store, 1, tmp_path)
    assert delete_snapshot(store, "before") and not delete_snapshot(store, "before")
    add_file(meta, blocks, b"h", b"even later")
    trio.run(flusher.cycle)  # checkpoint 4: nothing keeps 1 now
    with pytest.raises(NoSuchKey):
        ckpt.read_manifest(store, 1)
    assert object_key(one.id) not in data_keys(store)
    assert flusher.retention.thinned == 3 and whole(store, 4, tmp_path)


def test_repacking_never_breaks_a_kept_checkpoint(tmp_path: Path) -> None:
    store, meta, blocks, flusher = make(tmp_path, keep="15m")
    clock = [time.time()]
    flusher.retention.clock = lambda: clock[0]
    inos = [add_file(meta, blocks, b"f%d" % i, bytes([i + 1]) * 50_000) for i in range(10)]
    trio.run(flusher.cycle)  # checkpoint 1: one pack of ten files
    for ino in inos[1:]:
        unlink(meta, blocks, ino)
    trio.run(flusher.cycle)  # 2: one survivor keeps the pack
    (old_pack,) = {r.pack for r in [meta.get_block(inos[0], 0)] if r is not None}
    assert old_pack is not None
    repacker = Repacker(meta, blocks, store, interval=0)
    trio.run(repacker.repack_once)
    assert trio.run(repacker.repack_once) == 1
    trio.run(flusher.cycle)  # 3 names the new pack
    assert object_key(old_pack) in data_keys(store)  # 1 and 2 still name the old one
    for seq in (1, 2, 3):
        assert whole(store, seq, tmp_path), seq
    blocks.clean.clear()
    assert store.get(object_key(old_pack)).count(bytes([5]) * 50_000) == 1  # a dead member
    clock[0] += 20 * MIN
    add_file(meta, blocks, b"later", b"x")
    trio.run(flusher.cycle)  # 4: 1, 2 and 3 are thinned, and the old pack goes
    assert object_key(old_pack) not in data_keys(store) and whole(store, 4, tmp_path)


def test_a_name_given_during_thinning_keeps_its_checkpoint(tmp_path: Path) -> None:
    """Thinning deletes manifests, then reads the names again and puts back a checkpoint
    named meanwhile, before any of its pages go; a name given once its manifest is gone is
    refused and taken back (meta/history.py)."""
    store, meta, blocks, flusher = make(tmp_path, keep="0")
    flusher.retention.interval = 3600  # no pass after the first: the test runs them
    for n in range(3):
        add_file(meta, blocks, b"f%d" % n, b"content %d" % n)
        trio.run(flusher.cycle)
    real_delete_many = store.delete_many
    outcome: dict[int, object] = {}

    def delete_many(keys: list[str]) -> None:
        """A user names checkpoint 1 just before the pass deletes its manifest, and
        checkpoint 2 just after."""
        if ckpt.manifest_key(1) in keys:
            outcome[1] = create_snapshot(store, "early", 1)
        real_delete_many(keys)
        if ckpt.manifest_key(2) in keys:
            try:
                outcome[2] = create_snapshot(store, "late", 2)
            except NoSuchKey as e:
                outcome[2] = e

    store.delete_many = delete_many  # type: ignore[method-assign]
    history = History()
    thinned = history.thin(store, Schedule.parse("0"), time.time())
    store.delete_many = real_delete_many  # type: ignore[method-assign]
    assert thinned.restored == [1] and thinned.deleted == [2] and thinned.kept == [1, 3]
    assert isinstance(outcome[2], NoSuchKey)
    assert sorted(read_snapshots(store)) == ["early"]  # "late" was taken back
    assert whole(store, 1, tmp_path) and whole(store, 3, tmp_path)


def test_a_pass_cut_short_puts_a_named_checkpoint_back_at_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails right after a pass deleted a manifest, before it could read the names
    again, and a name is given in that moment: the next pass puts the manifest back."""
    store, meta, blocks, flusher = make(tmp_path, keep="0")
    flusher.retention.interval = 3600
    for n in range(2):
        add_file(meta, blocks, b"f%d" % n, b"content %d" % n)
        trio.run(flusher.cycle)
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # the retries of the second read
    history = History()
    history.refresh(store)
    real_list = store.list
    failing = [False]

    def list_(prefix: str = "") -> Iterator[tuple[str, int]]:
        if failing[0] and prefix == history_module.SNAPSHOT_PREFIX:
            raise TransientStoreError("the store is down")
        return real_list(prefix)

    def delete_many(keys: list[str]) -> None:
        assert create_snapshot(store, "meanwhile", 1) is not None  # after the first read
        LocalStore.delete_many(store, keys)
        failing[0] = True

    store.list = list_  # type: ignore[method-assign]
    store.delete_many = delete_many  # type: ignore[method-assign]
    with pytest.raises(TransientStoreError):
        history.thin(store, Schedule.parse("0"), time.time())
    failing[0] = False
    store.delete_many = lambda keys: LocalStore.delete_many(store, keys)  # type: ignore
    assert store.head(ckpt.manifest_key(1)) is None and 1 in history.manifests
    thinned = history.thin(store, Schedule.parse("0"), time.time())
    assert thinned.restored == [1] and thinned.kept == [1, 2]
    assert whole(store, 1, tmp_path)


def test_blocks_remember_the_first_checkpoint_that_may_name_them(tmp_path: Path) -> None:
    """An object's birth is never after the first checkpoint that names it: uploaded in the
    cycle that publishes checkpoint N, it is born N (the copy, exactly; the live database, at
    most N)."""
    store, meta, blocks, flusher = make(tmp_path, keep="1h")
    births: dict[str, int] = {}
    for n in range(1, 5):  # a pack of three blocks, a lone block (an object of its own), ...
        ino = add_file(meta, blocks, b"f%d" % n, b"x" * (2 * BS + n) if n % 2 else b"y")
        trio.run(flusher.cycle)
        for ref in meta.blocks_in(ino, 0, 2).values():
            births[ref.pack or ref.id] = n
    live = dict(meta.conn.execute("SELECT id, born FROM objects").fetchall())
    assert live == births and len(births) == 4
    db = tmp_path / "four.db"
    trio.run(lambda: ckpt.fetch(store, 4, db, trio.CapacityLimiter(4)))
    conn = sqlite3.connect(db)
    assert dict(conn.execute("SELECT id, born FROM objects").fetchall()) == births
    conn.close()
