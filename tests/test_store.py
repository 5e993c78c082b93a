"""The store layer against the directory store and two real S3 servers (moto, `rclone serve s3`).

Every behaviour test runs on all three backends, so the upper layers can count on one contract.
Servers are started once per module by fixtures defined here (prefixed `_store_` so they do not
collide with conftest's); each test works under a fresh key prefix in a shared bucket.

What the servers do differently (found by these tests, rclone 1.75 / moto 5.2):
- moto enforces `IfNoneMatch='*'` (412 PreconditionFailed) but accepts any credentials.
- rclone checks credentials, but silently ignores `IfNoneMatch` and overwrites; S3Store detects
  that with a probe object and falls back to HEAD-then-PUT (racy between writers, warned once).
- rclone stores a 'dir/' marker key as a plain file 'dir', answers 500 to a PUT of 'a' while
  'a/b' exists, rejects 'a//b', and prunes empty directories on delete. `check_key` keeps wsfs
  inside what every backend can store.
- Both answer 416 InvalidRange for a range starting at or past the end (also on empty objects),
  and 404 without an error code to HEAD of a missing bucket (indistinguishable from a missing key).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions as bex
import pytest
from botocore.stub import Stubber
from s3servers import S3Server, free_port, start_moto, start_rclone

from wsfs.errors import StoreError, UsageError
from wsfs.store import (
    LocalStore,
    NoSuchKey,
    ObjectStore,
    S3Store,
    TransientStoreError,
    open_store,
    probe,
)

pytestmark = [pytest.mark.store, pytest.mark.timeout(60)]

BUCKET = "wsfs-test"
BACKENDS = ["local", "moto", "rclone"]
S3_BACKENDS = ["moto", "rclone"]

# Everything that could make boto3 find credentials other than the ones a test sets.
_AWS_ENV = [
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
]


@pytest.fixture(scope="module")
def _store_moto() -> Iterator[S3Server]:
    server = start_moto()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def _store_rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_rclone(tmp_path_factory.mktemp("rclone-root"))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def _store_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Isolate boto3 from the machine's AWS configuration (and from instance metadata)."""
    for name in _AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


@dataclass
class Backend:
    """One backend under test; `open` gives a store under a fresh prefix."""

    name: str
    server: S3Server | None
    tmp: Path

    def open(self, prefix: str | None = None, **s3_options: Any) -> ObjectStore:
        prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
        if self.server is None:
            return open_store((self.tmp / "store" / prefix).as_uri())
        if s3_options:
            return S3Store(BUCKET, prefix, endpoint_url=self.server.endpoint_url,
                           path_style=True, **s3_options)
        return open_store(f"s3://{BUCKET}/{prefix}/", endpoint_url=self.server.endpoint_url)


@pytest.fixture
def _store_server(request: pytest.FixtureRequest, _store_aws_env: pytest.MonkeyPatch
                  ) -> S3Server:
    """The S3 server named by the test's parameter, with its credentials in the environment."""
    server: S3Server = request.getfixturevalue(f"_store_{request.param}")
    _store_aws_env.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    _store_aws_env.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    return server


@pytest.fixture(params=BACKENDS)
def _store_backend(request: pytest.FixtureRequest, _store_aws_env: pytest.MonkeyPatch,
                   tmp_path: Path) -> Backend:
    server: S3Server | None = None
    if request.param != "local":
        server = request.getfixturevalue(f"_store_{request.param}")
        _store_aws_env.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        _store_aws_env.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    return Backend(request.param, server, tmp_path)


@pytest.fixture
def _store(_store_backend: Backend) -> ObjectStore:
    return _store_backend.open()


# -- the ObjectStore contract, on every backend -----------------------------------------------


def test_put_get_head_delete(_store: ObjectStore) -> None:
    _store.put("wsfs.json", b'{"format": 1}')
    assert _store.get("wsfs.json") == b'{"format": 1}'
    assert _store.head("wsfs.json") == 13
    _store.put("wsfs.json", b"replaced")  # put overwrites
    assert _store.get("wsfs.json") == b"replaced"
    _store.delete("wsfs.json")
    assert _store.head("wsfs.json") is None
    _store.delete("wsfs.json")  # deleting a missing object is fine


def test_missing_key(_store: ObjectStore) -> None:
    with pytest.raises(NoSuchKey):
        _store.get("data/nope")
    with pytest.raises(NoSuchKey):
        _store.get_range("data/nope", 0, 10)
    with pytest.raises(NoSuchKey):
        _store.get_range("data/nope", 0, 0)
    assert _store.head("data/nope") is None
    _store.delete("data/nope")
    _store.put("data/x", b"1")
    with pytest.raises(NoSuchKey):  # a "directory" of keys is not an object
        _store.get("data")
    assert _store.head("data") is None


def test_get_range(_store: ObjectStore) -> None:
    _store.put("blk", b"0123456789")
    assert _store.get_range("blk", 0, 4) == b"0123"
    assert _store.get_range("blk", 3, 4) == b"3456"
    assert _store.get_range("blk", 8, 100) == b"89"  # fewer at the end
    assert _store.get_range("blk", 10, 5) == b""  # at the end
    assert _store.get_range("blk", 50, 5) == b""  # past the end
    assert _store.get_range("blk", 2, 0) == b""
    _store.put("empty", b"")
    assert _store.get_range("empty", 0, 10) == b""
    with pytest.raises(ValueError):
        _store.get_range("blk", -1, 2)


def test_binary_and_empty_objects(_store: ObjectStore) -> None:
    every_byte = bytes(range(256)) * 4
    _store.put("bin", every_byte)
    assert _store.get("bin") == every_byte
    _store.put("empty", b"")
    assert _store.get("empty") == b""
    assert _store.head("empty") == 0
    assert ("empty", 0) in list(_store.list())


@pytest.mark.timeout(120)
def test_large_object(_store: ObjectStore) -> None:
    data = os.urandom(8 * 1024 * 1024)
    _store.put("data/big", data)
    assert _store.head("data/big") == len(data)
    assert _store.get("data/big") == data
    start, length = 5_000_000, 1 << 20
    assert _store.get_range("data/big", start, length) == data[start : start + length]


def test_list_order_and_prefixes(_store: ObjectStore) -> None:
    keys = {"a-c": 3, "a/b": 1, "a/b2/c": 6, "ab": 2, "data/00/x": 4, "lease": 5, "wsfs.json": 0}
    for key, size in keys.items():
        _store.put(key, b"x" * size)
    # Whole-key code-point order: 'a-c' < 'a/b' because '-' < '/' (a naive tree walk gets this
    # wrong for the directory store).
    assert list(_store.list()) == sorted(keys.items())
    assert list(_store.list("a/")) == [("a/b", 1), ("a/b2/c", 6)]
    assert list(_store.list("a/b")) == [("a/b", 1), ("a/b2/c", 6)]
    assert list(_store.list("a")) == [("a-c", 3), ("a/b", 1), ("a/b2/c", 6), ("ab", 2)]
    assert list(_store.list("data/00/")) == [("data/00/x", 4)]
    assert list(_store.list("zzz")) == []


def test_list_pagination(_store_backend: Backend) -> None:
    store = _store_backend.open(list_page_size=3)
    keys = sorted(f"meta/{i:03d}" for i in range(10))
    for key in keys:
        store.put(key, b"m")
    assert [k for k, _ in store.list("meta/")] == keys


def test_prefixes_are_isolated(_store_backend: Backend) -> None:
    base = f"t-{uuid.uuid4().hex[:12]}"
    p = _store_backend.open(f"{base}/p")
    pq = _store_backend.open(f"{base}/pq")
    p.put("k", b"1")
    pq.put("k", b"2")
    assert list(p.list()) == [("k", 1)]
    assert p.get("k") == b"1"
    assert pq.get("k") == b"2"


def test_delete_many(_store: ObjectStore) -> None:
    for i in range(5):
        _store.put(f"data/{i}", b"d")
    _store.delete_many(["data/0", "data/2", "data/missing"])
    _store.delete_many([])
    assert [k for k, _ in _store.list()] == ["data/1", "data/3", "data/4"]


def test_put_if_absent(_store_backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="wsfs.store")
    store = _store_backend.open()
    assert store.put_if_absent("lease", b"first") is True
    assert store.put_if_absent("lease", b"second") is False
    assert store.get("lease") == b"first"
    store.delete("lease")
    assert store.put_if_absent("lease", b"third") is True
    assert store.get("lease") == b"third"
    assert list(store.list()) == [("lease", 5)]  # no probe or temp object left behind
    if isinstance(store, S3Store):
        # moto enforces If-None-Match; rclone serve s3 accepts the header and overwrites, so the
        # store must notice and fall back (with a warning) instead of trusting it.
        honoured = _store_backend.name == "moto"
        assert store.conditional_writes is honoured
        warnings = [r for r in caplog.records if "cannot fence" in r.getMessage()]
        assert len(warnings) == (0 if honoured else 1)


def test_put_if_absent_race(_store_backend: Backend) -> None:
    """Exactly one of many concurrent creators wins (where the backend can guarantee it)."""
    if _store_backend.name == "rclone":
        pytest.skip("rclone serve s3 ignores If-None-Match: HEAD-then-PUT cannot exclude a race")
    store = _store_backend.open()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: store.put_if_absent("lease", b"%d" % i), range(16)))
    assert results.count(True) == 1
    assert store.get("lease") == b"%d" % results.index(True)


def test_put_if_match(_store_backend: Backend) -> None:
    """A replace conditional on the ETag last seen: refused once another write changed the
    object, or deleted it; rclone serve s3 ignores If-Match, so there it is a check then a
    put (sequentially still refused)."""
    store = _store_backend.open()
    store.put("meta/HEAD", b"1")
    data, tag = store.get_tagged("meta/HEAD")
    assert data == b"1" and tag
    new = store.put_if_match("meta/HEAD", b"2", tag)
    assert new is not None and new != tag
    assert store.get_tagged("meta/HEAD") == (b"2", new)
    assert store.put_if_match("meta/HEAD", b"3", tag) is None  # stale: another write since
    assert store.get("meta/HEAD") == b"2"
    store.delete("meta/HEAD")
    assert store.put_if_match("meta/HEAD", b"4", new) is None  # gone
    assert store.head("meta/HEAD") is None
    with pytest.raises(NoSuchKey):
        store.get_tagged("meta/HEAD")
    if isinstance(store, S3Store):
        assert store.conditional_writes is (_store_backend.name == "moto")


def test_put_if_match_race(_store_backend: Backend) -> None:
    """Of many writers replacing the same version at once, exactly one wins (the fence)."""
    if _store_backend.name == "rclone":
        pytest.skip("rclone serve s3 ignores If-Match: a check then a PUT cannot exclude a race")
    store = _store_backend.open()
    store.put("lease", b"old")
    _, tag = store.get_tagged("lease")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: store.put_if_match("lease", b"%d" % i, tag),
                                range(16)))
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1, results
    assert store.get("lease") == b"%d" % winners[0]


def test_concurrent_puts(_store: ObjectStore) -> None:
    values = {f"data/{i % 4}/{i}": os.urandom(1000 + i) for i in range(64)}
    shared = [bytes([i]) * 50_000 for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: _store.put(*kv), values.items()))
        list(pool.map(lambda v: _store.put("hot", v), shared))
    for key, value in values.items():
        assert _store.get(key) == value
    assert _store.get("hot") in shared  # one whole write, never a mix


@pytest.mark.parametrize("key", ["", "/abs", "dir/", "a//b", "../up", "a/../b", "./a", "a/.",
                                 ".wsfs-tmp-x", "d/.wsfs-probe-1", "nul\0byte"])
def test_invalid_keys(_store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        _store.put(key, b"x")
    with pytest.raises(ValueError):
        _store.get(key)


def test_probe(_store: ObjectStore) -> None:
    probe(_store)
    _store.put("k", b"v")
    probe(_store)


# -- the directory store ----------------------------------------------------------------------


def test_local_leaves_no_temp_files_and_prunes_dirs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b/c", b"1")
    assert store.put_if_absent("a/b/d", b"2") is True
    assert store.put_if_absent("a/b/d", b"3") is False
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["c", "d"]
    store.delete_many(["a/b/c", "a/b/d"])
    assert list(tmp_path.iterdir()) == []  # empty directories pruned...
    store.put("a", b"file")  # ...so the name is free again
    assert store.get("a") == b"file"


def test_local_skips_crash_leftovers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("data/1", b"x")
    (tmp_path / "data" / ".wsfs-tmp-deadbeef").write_bytes(b"half a blo")
    assert list(store.list()) == [("data/1", 1)]


def test_local_key_clash_is_a_store_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"file")
    with pytest.raises(StoreError, match="clash"):
        store.put("a/b", b"x")


def test_open_store_file_creates_dir(tmp_path: Path) -> None:
    root = tmp_path / "new" / "store"
    store = open_store(root.as_uri())
    assert isinstance(store, LocalStore)
    assert root.is_dir()
    assert store.url == root.as_uri()
    assert isinstance(open_store(f"file://localhost{root}"), LocalStore)


def test_open_store_file_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(StoreError):
        open_store((tmp_path / "f").as_uri())


# -- URL parsing --------------------------------------------------------------------------------


def test_open_store_s3_parsing(_store_aws_env: pytest.MonkeyPatch) -> None:
    store = open_store("s3://my-bucket//ws/alice/", region="eu-west-1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.url) == ("my-bucket", "ws/alice", "s3://my-bucket/ws/alice")
    assert store.endpoint_url is None
    assert open_store("s3://my.bucket.1").url == "s3://my.bucket.1"
    _store_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env_store = open_store("s3://abc")
    assert isinstance(env_store, S3Store)
    assert env_store.endpoint_url == "http://127.0.0.1:9"
    assert env_store._client.meta.config.s3["addressing_style"] == "path"
    virtual = open_store("s3://abc", path_style=False)
    assert isinstance(virtual, S3Store)
    assert virtual._client.meta.config.s3["addressing_style"] == "auto"


@pytest.mark.parametrize("url", [
    "mybucket/prefix",  # no scheme
    "/abs/dir",  # a path, not a URL
    "gs://bucket/x",  # unknown scheme
    "s3://",  # empty bucket
    "s3:///prefix",  # empty bucket
    "s3://ab",  # too short
    "s3://" + "b" * 64,  # too long
    "s3://My_Bucket",  # uppercase, underscore
    "s3://-bucket",  # must start with a letter or digit
    "s3://bucket-",  # must end with one
    "s3://bu..cket",
    "s3://192.168.1.10",  # looks like an IP address
    "s3://xn--bucket",  # reserved prefix
    "s3://key:secret@bucket/x",  # credentials in the URL
    "s3://bucket/a/../b",  # dot-dot in the prefix
    "s3://bucket/x?versionId=1",
    "s3://bucket/x#frag",
    "file://relative/dir",  # host part, i.e. two slashes instead of three
    "file://otherhost/abs/dir",
    "file:relative",
    "file:/abs",  # no '//'
])
def test_open_store_rejects_malformed_urls(url: str) -> None:
    with pytest.raises(UsageError) as info:
        open_store(url)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_open_store_rejects_bad_endpoint() -> None:
    with pytest.raises(UsageError, match="http"):
        open_store("s3://bucket", endpoint_url="localhost:9000")


# -- failures a user can cause -----------------------------------------------------------------


@pytest.mark.parametrize("_store_server", S3_BACKENDS, indirect=True)
def test_unknown_bucket(_store_server: S3Server) -> None:
    store = open_store("s3://no-such-bucket-here/x", endpoint_url=_store_server.endpoint_url)
    with pytest.raises(StoreError, match=r"no-such-bucket-here.*does not exist") as info:
        probe(store)
    assert not isinstance(info.value, TransientStoreError)
    with pytest.raises(StoreError):
        store.put("k", b"v")
    with pytest.raises(StoreError):
        store.get("k")  # a missing bucket is not a missing key


@pytest.mark.parametrize(("access", "secret", "match"), [
    ("wrong-access", "wrong-secret", "access key was refused"),
    ("rclone-access", "wrong-secret", "secret key does not match"),
])
def test_wrong_credentials(_store_rclone: S3Server, _store_aws_env: pytest.MonkeyPatch,
                           access: str, secret: str, match: str) -> None:
    """rclone checks credentials; moto (without IAM emulation) accepts any, so not tested there."""
    _store_aws_env.setenv("AWS_ACCESS_KEY_ID", access)
    _store_aws_env.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store(f"s3://{BUCKET}/x", endpoint_url=_store_rclone.endpoint_url)
    with pytest.raises(StoreError, match=match) as info:
        probe(store)
    assert not isinstance(info.value, TransientStoreError)
    assert "AWS_" in str(info.value)


def test_no_credentials(_store_moto: S3Server, _store_aws_env: pytest.MonkeyPatch) -> None:
    store = open_store(f"s3://{BUCKET}/x", endpoint_url=_store_moto.endpoint_url)
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"):
        probe(store)


def test_unknown_profile(_store_aws_env: pytest.MonkeyPatch) -> None:
    _store_aws_env.setenv("AWS_PROFILE", "no-such-profile")
    store = open_store("s3://bucket", endpoint_url="http://127.0.0.1:9")  # no client yet
    with pytest.raises(StoreError, match="no-such-profile"):
        probe(store)


@pytest.mark.timeout(30)
def test_unreachable_endpoint(_store_aws_env: pytest.MonkeyPatch) -> None:
    _store_aws_env.setenv("AWS_ACCESS_KEY_ID", "a")
    _store_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "b")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    fast = S3Store("bucket", "x", endpoint_url=endpoint, path_style=True,
                   connect_timeout=1, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(TransientStoreError, match="Cannot connect to the S3 endpoint"):
        probe(fast)
    assert time.monotonic() - started < 5
    # With the default retries it still gives up within a bounded time.
    started = time.monotonic()
    with pytest.raises(StoreError, match=endpoint):
        open_store("s3://bucket/x", endpoint_url=endpoint).put("k", b"v")
    assert time.monotonic() - started < 15


# -- error mapping, with botocore's stubbed responses (no server) ------------------------------


@pytest.fixture
def _store_stubbed(_store_aws_env: pytest.MonkeyPatch) -> Iterator[tuple[S3Store, Stubber]]:
    _store_aws_env.setenv("AWS_ACCESS_KEY_ID", "a")
    _store_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "b")
    store = S3Store("bucket", "p", endpoint_url="http://127.0.0.1:9", path_style=True,
                    conditional_writes=True)
    with Stubber(store._client) as stubber:
        yield store, stubber
        stubber.assert_no_pending_responses()


@pytest.mark.parametrize(("code", "status", "transient"), [
    ("SlowDown", 503, True),
    ("InternalError", 500, True),
    ("ServiceUnavailable", 503, True),
    ("AccessDenied", 403, False),
    ("NoSuchBucket", 404, False),
    ("InvalidAccessKeyId", 403, False),
    ("SomethingNew", 400, False),
])
def test_error_mapping(_store_stubbed: tuple[S3Store, Stubber], code: str, status: int,
                       transient: bool) -> None:
    store, stubber = _store_stubbed
    stubber.add_client_error("put_object", service_error_code=code, http_status_code=status)
    with pytest.raises(StoreError) as info:
        store.put("k", b"v")
    assert isinstance(info.value, TransientStoreError) is transient
    assert getattr(info.value, "transient", False) is transient
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


@pytest.mark.parametrize("exc", [
    bex.ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"),  # a blackholed endpoint
    bex.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    bex.IncompleteReadError(actual_bytes=1, expected_bytes=2),  # a short body
], ids=lambda e: type(e).__name__)
def test_connection_failures_are_transient(_store_stubbed: tuple[S3Store, Stubber],
                                           exc: Exception) -> None:
    """Retried until the read deadline like a refused connection, not an EIO at once
    with a traceback logged."""
    store, _ = _store_stubbed
    with pytest.raises(TransientStoreError):
        store._raise(exc, "get", "k")


def test_put_if_absent_falls_back_when_refused(_store_stubbed: tuple[S3Store, Stubber],
                                                caplog: pytest.LogCaptureFixture) -> None:
    store, stubber = _store_stubbed
    stubber.add_client_error("put_object", service_error_code="NotImplemented",
                             http_status_code=501)
    stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stubber.add_response("put_object", {}, {"Bucket": "bucket", "Key": "p/lease", "Body": b"1"})
    stubber.add_response("head_object", {"ContentLength": 1},
                         {"Bucket": "bucket", "Key": "p/lease"})
    with caplog.at_level(logging.WARNING, logger="wsfs.store"):
        assert store.put_if_absent("lease", b"1") is True
        assert store.put_if_absent("lease", b"2") is False
    assert store.conditional_writes is False
    assert len([r for r in caplog.records if "cannot fence" in r.getMessage()]) == 1


@pytest.mark.timeout(180)
def test_more_than_1000_keys(_store_moto: S3Server, _store_aws_env: pytest.MonkeyPatch) -> None:
    """Listing and delete_many cross S3's 1000-key page and batch limits (moto only: speed)."""
    _store_aws_env.setenv("AWS_ACCESS_KEY_ID", _store_moto.access_key)
    _store_aws_env.setenv("AWS_SECRET_ACCESS_KEY", _store_moto.secret_key)
    store = open_store(f"s3://{BUCKET}/many-{uuid.uuid4().hex[:8]}",
                       endpoint_url=_store_moto.endpoint_url)
    keys = [f"data/{i:05d}" for i in range(1234)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: store.put(k, b""), keys))
    assert [k for k, _ in store.list()] == keys
    store.delete_many(keys)
    assert list(store.list()) == []


def test_a_tls_failure_is_not_transient(_store_stubbed: tuple[S3Store, Stubber]) -> None:
    """A certificate the client refuses fails the same way on every try: say so at once."""
    store, _ = _store_stubbed
    with pytest.raises(StoreError) as info:
        store._raise(bex.SSLError(endpoint_url="https://x", error="bad certificate"), "get", "k")
    assert not isinstance(info.value, TransientStoreError)
    assert "certificate" in str(info.value)
