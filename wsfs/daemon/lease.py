"""Who may write this workspace now: a lease object in the store, renewed while mounted.

Two writers of one workspace would each publish checkpoints that ignore the other's, so a
second mount is refused while a live lease names someone else. A lease is live while it has
not expired and, when it names this host, its process still runs wsfs. So after a crash the
same host takes over at once, another host after the TTL, and `--force` takes over a live one.

The clocks only decide when a takeover may be tried; the store decides who holds the lease.
It is created with `put_if_absent` (S3 `If-None-Match: *`, a hard link on the directory
store), and every later write of it (renewal, takeover) is `put_if_match` on the ETag this
mount last wrote or read: a takeover from under a paused holder changes the ETag, so the old
holder's next renewal, however late it lands (stalled in retries, paused past expiry), is
refused instead of overwriting, and the old holder counts itself taken over (fenced). Its
publications are fenced the same way by meta/HEAD (meta/checkpoint.py). On a server that
ignores the conditions (`rclone serve s3`) they are a check then a plain PUT, as before,
with the windows docs/faults.md lists.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from ..config import env_seconds
from ..errors import LeaseError
from ..meta.checkpoint import FENCED_FIX
from ..runtime import pid_alive
from ..store import NoSuchKey, ObjectStore, replace_if

log = logging.getLogger(__name__)

LEASE_KEY = "lease"
LEASE_TTL = 60.0


def clock() -> float:
    """The wall clock the lease is judged by: time.time(), moved by $WSFS_CLOCK_SKEW seconds
    (tests: hosts whose clocks disagree by minutes; the store's fence must not care)."""
    return time.time() + env_seconds("WSFS_CLOCK_SKEW", 0.0, signed=True)


def default_ttl() -> float:
    """The lease TTL: 60 s, or $WSFS_LEASE_TTL (tests use a few seconds)."""
    return env_seconds("WSFS_LEASE_TTL", LEASE_TTL, positive=True)


@dataclass(frozen=True, slots=True)
class Holder:
    host: str
    pid: int
    mount_id: str
    cache_dir: str
    expires: float

    def alive_here(self) -> bool:
        """Whether the holder may still be running: false only for a dead wsfs on this host.

        A holder on another host cannot be checked, so it counts as alive until its lease
        expires. On this host the pid must exist and still be a wsfs process (a container
        restarted with the same host name reuses small pids).
        """
        if self.host != socket.gethostname():
            return True
        if not pid_alive(self.pid):
            return False
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return b"wsfs" in f.read()
        except OSError:
            return True

    def describe(self) -> str:
        left = self.expires - clock()
        return (f"host {self.host}, pid {self.pid}, cache dir {self.cache_dir}, "
                f"lease expiring in {max(0, left):.0f}s")


def read_holder(store: ObjectStore) -> Holder | None:
    return read_tagged_holder(store)[0]


def read_tagged_holder(store: ObjectStore) -> tuple[Holder | None, str | None]:
    """The lease's holder and the lease object's ETag ((None, None): no lease)."""
    try:
        raw, tag = store.get_tagged(LEASE_KEY)
    except NoSuchKey:
        return None, None
    try:
        return Holder(**json.loads(raw)), tag
    except (ValueError, TypeError):
        log.warning("the lease object is unreadable; treating the workspace as free")
        return None, tag


class Lease:
    """This mount's claim on the workspace."""

    def __init__(self, store: ObjectStore, cache_dir: str, ttl: float | None = None) -> None:
        self.store = store
        self.ttl = default_ttl() if ttl is None else ttl
        self.cache_dir = cache_dir
        self.mount_id = uuid.uuid4().hex
        self.lost = False  # another mount took the lease over (with --force or after expiry)
        self.usurper = ""  # who took it over, for messages
        self.etag: str | None = None  # the lease object's ETag as this mount last wrote it

    def _record(self) -> bytes:
        holder = Holder(socket.gethostname(), os.getpid(), self.mount_id, self.cache_dir,
                        clock() + self.ttl)
        return json.dumps(asdict(holder)).encode()

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise LeaseError naming the live holder (blocking)."""
        if self.store.put_if_absent(LEASE_KEY, self._record()):
            self._read_back()
            return
        holder, tag = read_tagged_holder(self.store)
        if holder is not None and holder.mount_id == self.mount_id:
            self.etag = tag  # our write landed, its answer was lost, the retry was refused
            return
        if holder is not None and not force:
            live = holder.expires > clock() and holder.alive_here()
            if live:
                raise LeaseError(
                    f"this workspace is already mounted ({holder.describe()}); unmount it "
                    "there first, or pass --force if that mount is gone for good"
                )
        if holder is not None:
            log.warning("taking over the lease of %s", holder.describe())
        if tag is None:  # released meanwhile: create it again
            if not self.store.put_if_absent(LEASE_KEY, self._record()):
                self._taken_meanwhile()
        elif replace_if(self.store, LEASE_KEY, self._record(), tag) is None:
            self._taken_meanwhile()  # the lease changed since we read it: another taker
        self._read_back()

    def _read_back(self) -> None:
        """Read the lease we just wrote: learn its ETag, and (on a store without conditional
        writes, where a racing taker's write may have replaced ours) that it is ours."""
        now, tag = read_tagged_holder(self.store)
        if now is None or now.mount_id != self.mount_id:
            self._taken_meanwhile(now)
        self.etag = tag

    def _taken_meanwhile(self, now: Holder | None = None) -> None:
        if now is None:
            now = read_holder(self.store)
        raise LeaseError(
            "another mount took this workspace over at the same moment"
            f"{f' ({now.describe()})' if now is not None else ''}; unmount it there first"
        )

    def renew(self) -> None:
        """Extend the lease, if it is still the object this mount last wrote; if someone else
        took it over (or deleted it), say so loudly and leave it to them.

        Stealing it back would make the two mounts alternate as holders forever; leaving it
        makes the other mount the one that the next `wsfs mount` sees.
        """
        if self.lost:
            return
        new = None if self.etag is None else replace_if(
            self.store, LEASE_KEY, self._record(), self.etag)
        if new is None:
            # A lease naming this mount is its own whatever its ETag: a renewal whose answer
            # was lost landed (a write refused by If-Match never lands), so try once more.
            holder, tag = read_tagged_holder(self.store)
            if holder is not None and holder.mount_id == self.mount_id and tag is not None:
                new = replace_if(self.store, LEASE_KEY, self._record(), tag)
        if new is None:  # (the daemon says so: it fences the mount)
            self._lose(read_holder(self.store))
            return
        self.etag = new

    def _lose(self, holder: Holder | None) -> None:
        """Count the lease as taken over. A lease gone from the store counts too: only a
        later holder's release (or `wsfs destroy`) deletes it, so writing it back, as this
        did, let a fenced mount publish over the work of the mounts since."""
        self.lost = True
        self.usurper = (holder.describe() if holder is not None
                        else "a mount that has released it since, or `wsfs destroy`")

    def check(self) -> None:
        """Raise LeaseError if another mount holds the lease now (blocking: one GET).

        The flusher calls this before publishing each checkpoint, so a mount that was taken
        over (`--force` elsewhere, or its lease expired during an outage) stops publishing
        instead of overwriting the new holder's checkpoints.
        """
        if not self.lost:
            holder = read_holder(self.store)
            if holder is not None and holder.mount_id == self.mount_id:
                return
            self._lose(holder)
        raise LeaseError(f"another mount took over this workspace ({self.usurper}); {FENCED_FIX}")

    def release(self) -> None:
        holder = read_holder(self.store)
        if holder is None or holder.mount_id == self.mount_id:
            self.store.delete(LEASE_KEY)
