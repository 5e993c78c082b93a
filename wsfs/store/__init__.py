"""The object store: where a workspace's blocks and checkpoints live.

`open_store` turns the URL a user typed (`s3://BUCKET[/PREFIX]` or `file:///ABS/DIR`) into an
`ObjectStore`; `probe` checks once, at mount or init, that the store can be used, so that a wrong
bucket or credentials fail with one clear sentence instead of on the first upload.

Errors: every failure a user can act on is a `StoreError` (exit code 3). Those worth retrying
(5xx, throttling, timeouts, an unreachable endpoint, a full disk) are the subclass
`TransientStoreError`, raised after botocore's own retries are spent; callers that must not give up
(the flusher, the final upload at unmount) retry those with backoff until their deadline.
"""

import os
import re
import urllib.parse
from pathlib import Path

from wsfs.errors import StoreError, UsageError
from wsfs.store.base import (
    RESERVED_PREFIX,
    NoSuchKey,
    ObjectStore,
    TransientStoreError,
    check_key,
)
from wsfs.store.local import LocalStore
from wsfs.store.s3 import S3Store

__all__ = [
    "LocalStore",
    "NoSuchKey",
    "ObjectStore",
    "S3Store",
    "TransientStoreError",
    "check_key",
    "open_store",
    "probe",
    "replace_if",
]

_URL_HELP = "use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def _bucket_problem(bucket: str) -> str | None:
    """Return why `bucket` breaks the S3 bucket naming rules, or None if it follows them."""
    if not 3 <= len(bucket) <= 63:
        return "must be 3 to 63 characters long"
    if not _BUCKET_RE.fullmatch(bucket):
        return ("may hold only lowercase letters, digits, '.' and '-', "
                "and must start and end with a letter or digit")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "must not have '..', '.-' or '-.' in it"
    if _IPV4_RE.fullmatch(bucket):
        return "must not look like an IP address"
    if bucket.startswith(_RESERVED_BUCKET_PREFIXES) or bucket.endswith(_RESERVED_BUCKET_SUFFIXES):
        return "uses a prefix or suffix that S3 reserves"
    return None


def _normalise_prefix(url: str, path: str) -> str:
    parts = [p for p in urllib.parse.unquote(path).split("/") if p]
    for part in parts:
        if part in (".", "..") or part.startswith(RESERVED_PREFIX) or "\0" in part:
            raise UsageError(f"Store URL {url!r} has an invalid prefix component {part!r}: "
                             "remove it from the URL.")
    return "/".join(parts)


def _default_endpoint() -> str | None:
    # The same variables boto3 reads, service-specific first; empty means unset.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _check_endpoint(endpoint_url: str) -> None:
    parts = urllib.parse.urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"Endpoint URL {endpoint_url!r} is not an http(s) URL: "
                         "give it as http://HOST:PORT or https://HOST.")


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool | None = None,
) -> ObjectStore:
    """Open the store that `url` names; raise UsageError (one sentence) if the URL is malformed.

    `s3://BUCKET[/PREFIX]`: the endpoint defaults to $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL
    (AWS itself when unset), and path-style addressing defaults to on whenever an endpoint is
    given, because MinIO, Ceph, moto and rclone are usually reached by IP or a name without
    wildcard DNS. `file:///ABS/DIR`: the directory is created if missing.
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or "://" not in url:
        raise UsageError(f"Store URL {url!r} has no scheme: {_URL_HELP}.")
    if parts.query or parts.fragment:
        raise UsageError(f"Store URL {url!r} must not have a '?query' or '#fragment': {_URL_HELP}.")
    scheme = parts.scheme.lower()
    if scheme == "s3":
        return _open_s3(url, parts, endpoint_url, region, path_style)
    if scheme == "file":
        return _open_file(url, parts)
    raise UsageError(f"Store URL {url!r} has unknown scheme {parts.scheme!r}: {_URL_HELP}.")


def _open_s3(
    url: str,
    parts: urllib.parse.SplitResult,
    endpoint_url: str | None,
    region: str | None,
    path_style: bool | None,
) -> S3Store:
    bucket = parts.netloc
    if not bucket:
        raise UsageError(f"Store URL {url!r} names no bucket: use s3://BUCKET[/PREFIX].")
    if "@" in bucket:
        raise UsageError(f"Store URL {url!r} must not carry credentials: set AWS_ACCESS_KEY_ID/"
                         "AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead.")
    problem = _bucket_problem(bucket)
    if problem is not None:
        raise UsageError(f"Bucket name {bucket!r} in {url!r} is invalid: it {problem}.")
    prefix = _normalise_prefix(url, parts.path)
    if endpoint_url is None:
        endpoint_url = _default_endpoint()
    if endpoint_url is not None:
        _check_endpoint(endpoint_url)
    if path_style is None:
        path_style = endpoint_url is not None
    return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region, path_style=path_style)


def _open_file(url: str, parts: urllib.parse.SplitResult) -> LocalStore:
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"Store URL {url!r} names host {parts.netloc!r}; the directory store "
                         "takes an absolute path with three slashes: file:///ABSOLUTE/DIR.")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise UsageError(f"Store URL {url!r} needs an absolute path: file:///ABSOLUTE/DIR.")
    if "\0" in path:
        raise UsageError(f"Store URL {url!r} has a NUL byte in its path: remove it.")
    root = Path(os.path.normpath(path))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"Cannot create the store directory {root}: {exc.strerror}; "
                         "choose a directory you can write to.") from None
    if not root.is_dir():
        raise StoreError(f"Store path {root} exists but is not a directory: "
                         "choose another path in the file:// URL.")
    return LocalStore(root)


def probe(store: ObjectStore) -> None:
    """Check that the store answers and lets us list it; raise StoreError with the fix if not.

    Listing is the cheapest request that proves the bucket exists and the credentials work
    (HEAD of a missing bucket just says 404, like a missing key). Write access shows up at the
    first write (the lease), with its own clear error. Only wsfs's scratch names are listed:
    a whole first page (1,000 keys, 28 KB of XML to parse) cost a mount ~30 ms.
    """
    try:
        for _ in store.list(RESERVED_PREFIX):
            break
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"Cannot read the store at {store.url}: {exc.strerror or exc}; "
                         "check that it exists and is readable.") from None


def replace_if(store: ObjectStore, key: str, data: bytes, etag: str) -> str | None:
    """`put_if_match`, where a refusal of this very write counts as its success: return the
    object's new ETag, or None if another writer changed it (or deleted it) since `etag`.

    A PUT whose answer was lost and that botocore retried is refused the second time (the
    object's tag is the new one by then); the bytes read back tell. Only the writer of
    `data` writes those exact bytes: a lease record names its mount and expiry, and meta/HEAD
    the mount that wrote it.
    """
    new = store.put_if_match(key, data, etag)
    if new is not None:
        return new
    try:
        current, tag = store.get_tagged(key)
    except NoSuchKey:
        return None
    return tag if current == data else None
