"""The S3 object store (AWS, MinIO, Ceph, moto, `rclone serve s3`, ...) over one boto3 client.

One client serves every worker thread: boto3 clients are thread-safe, and a pool of
`max_pool_connections` keeps that many requests in flight without reconnecting. botocore retries
throttling, 5xx and connection errors itself ("standard" mode, `max_attempts`, kept small so a
wrong endpoint fails in seconds: the flusher retries on its own schedule); what still fails
after that is raised as `TransientStoreError`, so the layers above can keep retrying with their own
deadline, while permanent failures (no bucket, bad credentials, access denied) are a `StoreError`
with one sentence saying what to fix. `NoSuchKey` is the only non-`StoreError` exception.

Conditional writes make `put_if_absent` (`If-None-Match: *`) and `put_if_match` (`If-Match`)
atomic: they are what fences a writer that lost the workspace (docs/faults.md). Some servers
reject the headers, and some silently ignore them and overwrite (`rclone serve s3` 1.75 does), so
the first conditional write checks which kind of server this is with a throwaway probe object
and falls back to a compare then a put, with one warning, where the server cannot do both.
"""

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn

import botocore.exceptions as bex
import botocore.session
from botocore.config import Config
from botocore.handlers import add_expect_header

from wsfs.errors import StoreError
from wsfs.store.base import RESERVED_PREFIX, NoSuchKey, TransientStoreError, check_key

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_THROTTLED = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "RequestThrottled", "InternalError", "ServiceUnavailable", "TooManyRequestsException",
}
_CREDENTIALS_FIX = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
# Answers meaning "this server does not do conditional writes" (rather than "the key exists").
_NO_CONDITIONAL = {"NotImplemented", "InvalidArgument", "InvalidRequest", "501"}
# Answers meaning "the condition did not hold": the key exists (If-None-Match), or it changed
# or is gone (If-Match); 409: a concurrent conditional write won.
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}
_NO_SUCH_ETAG = '"00000000000000000000000000000000"'  # matches no object's ETag
DELETE_BATCH = 1000  # the S3 limit for one DeleteObjects request


class S3Store:
    """An `ObjectStore` in `s3://bucket/prefix`; share one instance between threads."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        max_pool_connections: int = 32,
        list_page_size: int = 1000,
        conditional_writes: bool | None = None,
    ) -> None:
        """Check the settings; no client yet, no request (use `wsfs.store.probe` to check
        access). The client is made at first use: `wsfs mount` opens the store to check the
        URL before it forks, and creating a client there (a tenth of a second or more) would
        be thrown away, since the daemon must make its own after the fork anyway.

        `conditional_writes`: None detects on first use whether the server honours
        If-None-Match; True/False skip the detection.
        """
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        self._where = f"{self.url} at {endpoint_url}" if endpoint_url else self.url
        self._list_page_size = list_page_size
        self._conditional = conditional_writes
        self._conditional_lock = threading.Lock()
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": "path" if path_style else "auto"},
            # Third-party servers often reject the CRC trailers boto3 >= 1.36 adds by default;
            # block integrity is checked above us anyway (a checksum per block in the metadata).
            request_checksum_calculation="when_required" if endpoint_url else "when_supported",
            response_checksum_validation="when_required" if endpoint_url else "when_supported",
        )
        self._settings = (endpoint_url, region, config)
        self._made_client: Any = None
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        client = self._made_client
        if client is None:
            with self._client_lock:
                if self._made_client is None:
                    self._made_client = self._make_client()
                client = self._made_client
        return client

    def _make_client(self) -> Any:
        endpoint_url, region, config = self._settings
        try:
            # botocore's own session: boto3's adds nothing wsfs uses (resources, transfer
            # helpers) and its import (s3transfer) cost every mount ~50 ms before serving.
            session = botocore.session.get_session()
            if (region is None and endpoint_url is not None
                    and session.get_config_variable("region") is None):
                region = "us-east-1"  # SigV4 needs some region; S3-compatibles accept this one
            client = session.create_client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
            # No `Expect: 100-continue` on PUTs: botocore's handling of it loses a response's
            # headers on a kept-alive connection that once answered such a request without
            # the interim 100 (boto/boto3#3757), and the PUT then hangs until the read
            # timeout (a minute of a final flush, seen with `rclone serve s3`). Our objects
            # are small; sending the body before the server's go-ahead costs nothing.
            client.meta.events.unregister("before-call.s3", add_expect_header)
            return client
        except bex.ProfileNotFound as exc:
            raise StoreError(f"AWS profile {exc.kwargs.get('profile')!r} is not configured: "
                             "fix AWS_PROFILE or add the profile to ~/.aws/config.") from None
        except (ValueError, bex.BotoCoreError) as exc:
            raise StoreError(f"Cannot set up the S3 client for {self._where}: {exc}; "
                             "check the endpoint URL, region and AWS configuration.") from None

    def __repr__(self) -> str:
        return f"S3Store({self._where!r})"

    @property
    def conditional_writes(self) -> bool | None:
        """Whether the server honours If-None-Match and If-Match (None until the first
        conditional write found out)."""
        return self._conditional

    # -- error mapping ---------------------------------------------------------------------

    def _raise(self, exc: Exception, op: str, key: str | None = None) -> NoReturn:
        """Raise the wsfs exception for a boto3 failure of `op` on `key`."""
        what = f"{op} {key!r} in {self.url}" if key is not None else f"{op} {self.url}"
        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if key is not None and (code in _NOT_FOUND or (status == 404 and not code)):
                raise NoSuchKey(key) from None
            raise self._client_error(code, status, str(err.get("Message", "")), what) from None
        if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
            raise StoreError(f"No usable AWS credentials found for {self._where}: "
                             f"{_CREDENTIALS_FIX}.") from None
        if isinstance(exc, bex.ConnectionError) and not isinstance(exc, bex.SSLError):
            # Refused, timed out, a proxy's (not TLS: a setting, not a moment). Unreachable may
            # mean "wrong URL" or "network down for a minute": callers decide.
            endpoint = self.endpoint_url or getattr(exc, "kwargs", {}).get("endpoint_url")
            raise TransientStoreError(
                f"Cannot connect to the S3 endpoint {endpoint} for {self.url}: "
                "check the endpoint URL (AWS_ENDPOINT_URL) and the network.") from None
        if isinstance(exc, bex.HTTPClientError | bex.ResponseStreamingError
                      | bex.IncompleteReadError):
            raise TransientStoreError(f"Cannot {what}: the connection failed ({exc}); "
                                      "check the network if this persists.") from None
        if isinstance(exc, bex.ParamValidationError):
            raise exc  # a bug in wsfs, not a store problem: keep the traceback
        raise StoreError(f"Cannot {what}: {exc}; check the S3 configuration.") from None

    def _client_error(self, code: str, status: int, message: str, what: str) -> StoreError:
        if code == "NoSuchBucket" or (status == 404 and code in _NOT_FOUND):
            return StoreError(f"Bucket {self.bucket!r} does not exist at "
                              f"{self.endpoint_url or 'AWS'}: create it or fix the store URL.")
        if code in ("InvalidAccessKeyId", "InvalidClientTokenId", "ExpiredToken",
                    "InvalidToken", "TokenRefreshRequired"):
            return StoreError(f"The AWS access key was refused by {self.endpoint_url or 'AWS'} "
                              f"({code}): {_CREDENTIALS_FIX} to valid credentials.")
        if code == "SignatureDoesNotMatch":
            return StoreError(f"The AWS secret key does not match the access key for "
                              f"{self._where}: fix AWS_SECRET_ACCESS_KEY or the profile.")
        if code in ("AccessDenied", "AllAccessDisabled", "403", "Forbidden") or status == 403:
            return StoreError(f"Access to {self._where} was denied: grant these credentials "
                              "s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject "
                              "(without ListBucket S3 also says 403 for missing objects).")
        if code == "PermanentRedirect" or code == "AuthorizationHeaderMalformed" or status == 301:
            return StoreError(f"Bucket {self.bucket!r} is in another region: set AWS_REGION "
                              "(or --region) to the bucket's region.")
        if code in _THROTTLED or status >= 500 or status == 429:
            return TransientStoreError(f"Cannot {what}: the server answered {code or status} "
                                       f"({message}); it will be retried.")
        return StoreError(f"Cannot {what}: the server answered {code or status} ({message}); "
                          "check the store URL and its configuration.")

    # -- ObjectStore -----------------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return self._key_prefix + key

    def get(self, key: str) -> bytes:
        """Return the whole object; raise `NoSuchKey` if it does not exist."""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            data: bytes = resp["Body"].read()
        except (bex.BotoCoreError, bex.ClientError) as exc:
            self._raise(exc, "get", key)
        return data

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """Return the whole object and its ETag; raise `NoSuchKey` if it does not exist."""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            data: bytes = resp["Body"].read()
        except (bex.BotoCoreError, bex.ClientError) as exc:
            self._raise(exc, "get", key)
        return data, str(resp.get("ETag", ""))

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object only if its ETag is still `etag`; return the new ETag, or None
        if it changed or is gone. Without conditional writes: a HEAD, then a plain PUT."""
        full = self._key(key)
        if self._conditional is None:
            self._detect_conditional_writes()
        if not self._conditional:
            try:
                current = self._client.head_object(Bucket=self.bucket, Key=full)
            except (bex.BotoCoreError, bex.ClientError) as exc:
                try:
                    self._raise(exc, "stat", key)
                except NoSuchKey:
                    return None
            if str(current.get("ETag", "")) != etag:
                return None
        try:
            kwargs = {"IfMatch": etag} if self._conditional else {}
            resp = self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **kwargs)
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CONDITION_FAILED or code in _NOT_FOUND or status in (404, 409, 412):
                return None
            self._raise(exc, "replace", key)
        except bex.BotoCoreError as exc:
            self._raise(exc, "replace", key)
        return str(resp.get("ETag", ""))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return `length` bytes from `start` (fewer at the end); raise `NoSuchKey`."""
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        if length == 0:
            if self.head(key) is None:
                raise NoSuchKey(key)
            return b""
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
            data: bytes = resp["Body"].read()
        except bex.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # start is at or past the end (or the object is empty)
            self._raise(exc, "get", key)
        except bex.BotoCoreError as exc:
            self._raise(exc, "get", key)
        if "ContentRange" not in resp:  # a server that ignored Range sent the whole object
            data = data[start : start + length]
        return data

    def put(self, key: str, data: bytes) -> None:
        """Write the whole object atomically (S3 PUT replaces objects atomically)."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (bex.BotoCoreError, bex.ClientError) as exc:
            self._raise(exc, "put", key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has that key; return False if one exists."""
        full = self._key(key)
        if self._conditional is None:
            self._detect_conditional_writes()
        if self._conditional:
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except bex.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _CONDITION_FAILED:
                    # 409 ConditionalRequestConflict: a concurrent conditional write is in
                    # flight; one of the two wins, and we treat ourselves as the loser.
                    return False
                if not self._rejects_conditional(exc):
                    self._raise(exc, "create", key)
                self._fall_back(f"the server refused If-None-Match ({code})")
            except bex.BotoCoreError as exc:
                self._raise(exc, "create", key)
        if self.head(key) is not None:
            return False
        self.put(key, data)
        return True

    @staticmethod
    def _rejects_conditional(exc: bex.ClientError) -> bool:
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status == 501 or str(err.get("Code", "")) in _NO_CONDITIONAL

    def _fall_back(self, why: str) -> None:
        with self._conditional_lock:
            if self._conditional is not False:
                log.warning("%s: %s; so wsfs cannot fence a paused or cut-off writer on this "
                            "store: the lease and meta/HEAD are written by a check then a "
                            "plain PUT, which two writers at once can both pass (see "
                            "docs/faults.md; use a store with conditional writes)",
                            self._where, why)
            self._conditional = False

    def _detect_conditional_writes(self) -> None:
        """Find out once whether the server enforces If-None-Match and If-Match, with a
        throwaway object.

        Two conditional PUTs of one new key: a server that honours If-None-Match refuses the
        second; one that ignores it (and would let two lease holders both "win") accepts it.
        Then a PUT with an If-Match no object matches, which such a server must refuse.
        """
        with self._conditional_lock:
            if self._conditional is not None:
                return
            probe = f"{self._key_prefix}{RESERVED_PREFIX}probe-{uuid.uuid4().hex}"
            verdict: str | None = None
            try:
                for attempt in (1, 2):
                    try:
                        self._client.put_object(
                            Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*"
                        )
                    except bex.ClientError as exc:
                        code = str(exc.response.get("Error", {}).get("Code", ""))
                        if attempt == 2 and code == "PreconditionFailed":
                            verdict = self._probe_if_match(probe)
                            if verdict is None:
                                self._conditional = True
                                return
                            break
                        if self._rejects_conditional(exc):
                            verdict = f"the server refused If-None-Match ({code})"
                            break
                        self._raise(exc, "create", probe)
                    except bex.BotoCoreError as exc:
                        self._raise(exc, "create", probe)
                else:
                    verdict = "the server ignores If-None-Match (a second create succeeded)"
            finally:
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=probe)
                except (bex.BotoCoreError, bex.ClientError):
                    log.debug("could not delete the probe object %s", probe, exc_info=True)
        self._fall_back(verdict)

    def _probe_if_match(self, probe: str) -> str | None:
        """Why the server cannot do If-Match on `probe` (which exists), or None if it can."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"",
                                    IfMatch=_NO_SUCH_ETAG)
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CONDITION_FAILED:
                return None
            if self._rejects_conditional(exc):
                return f"the server refused If-Match ({code})"
            self._raise(exc, "replace", probe)
        except bex.BotoCoreError as exc:
            self._raise(exc, "replace", probe)
        return "the server ignores If-Match (a PUT whose ETag did not match succeeded)"

    def head(self, key: str) -> int | None:
        """Return the object's size, or None if it does not exist.

        HEAD has no body, so a missing bucket also looks like 404 here; `probe` (a LIST)
        is what tells the two apart.
        """
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (bex.BotoCoreError, bex.ClientError) as exc:
            try:
                self._raise(exc, "stat", key)
            except NoSuchKey:
                return None
        size: int = resp["ContentLength"]
        return size

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error (S3 says 204)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (bex.BotoCoreError, bex.ClientError) as exc:
            try:
                self._raise(exc, "delete", key)
            except NoSuchKey:
                return

    def delete_many(self, keys: list[str]) -> None:
        """Delete objects with DeleteObjects, `DELETE_BATCH` keys per request."""
        full = [self._key(k) for k in keys]
        for i in range(0, len(full), DELETE_BATCH):
            batch = full[i : i + DELETE_BATCH]
            try:
                resp = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (bex.BotoCoreError, bex.ClientError) as exc:
                self._raise(exc, "delete objects from")
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                code, message = str(first.get("Code", "")), str(first.get("Message", ""))
                key = str(first.get("Key", ""))[len(self._key_prefix) :]
                log.debug("delete_objects failed for %d keys: %r", len(errors), errors[:10])
                raise self._client_error(code, 0, message, f"delete {key!r} in {self.url}")

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield (key, size) for every object whose key starts with `prefix`, in key order."""
        for key, size, _ in self.list_detailed(prefix):
            yield key, size

    def list_detailed(self, prefix: str = "") -> Iterator[tuple[str, int, float]]:
        """Yield (key, size, LastModified as epoch seconds), in key order.

        S3 lists in UTF-8 byte order, which is also Python's str order. Keys outside wsfs's
        key rules (a 'dir/' marker someone made by hand) are skipped: wsfs never wrote them.
        """
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self._key_prefix + prefix,
            PaginationConfig={"PageSize": self._list_page_size},
        )
        strip = len(self._key_prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = str(obj["Key"])[strip:]
                    try:
                        check_key(key)
                    except ValueError:
                        continue
                    yield key, int(obj["Size"]), obj["LastModified"].timestamp()
        except (bex.BotoCoreError, bex.ClientError) as exc:
            self._raise(exc, "list")
