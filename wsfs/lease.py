"""Who may write this workspace now: a lease object in the store, renewed while mounted.

Two writers of one workspace would each publish checkpoints that ignore the other's, so a
second mount is refused while a live lease names someone else. The lease is created with a
conditional write (`put_if_absent`: S3 `If-None-Match: *` where the server honours it, a hard
link on the directory store); on a server that ignores the header (`rclone serve s3`) it falls
back to HEAD then PUT, which two mounts starting within one round trip could both pass.

A lease is live while it has not expired and, when it names this host, its process still runs
wsfs. So after a crash the same host takes over at once, another host after the TTL. Taking
over is an overwrite followed by a read-back: of two mounts racing for one expired lease, the
one whose write landed first sees the other's record and gives up, but two writes that land
before either read-back can both win; that window is documented in docs/faults.md. `--force`
takes over a live lease; if its holder is in fact still running, it notices at its next
renewal, stops renewing and logs an error, but until it is unmounted both mounts publish
checkpoints and the last one to publish wins the store (see docs/faults.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from .errors import LeaseError
from .runtime import env_seconds
from .store import NoSuchKey, ObjectStore

log = logging.getLogger(__name__)

LEASE_KEY = "lease"
LEASE_TTL = 60.0


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
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{self.pid}/stat") as f:
                zombie = f.read().rsplit(") ", 1)[-1].startswith("Z")
        except OSError:
            return True
        return b"wsfs" in cmdline and not zombie

    def describe(self) -> str:
        left = self.expires - time.time()
        return (f"host {self.host}, pid {self.pid}, cache dir {self.cache_dir}, "
                f"lease expiring in {max(0, left):.0f}s")


def read_holder(store: ObjectStore) -> Holder | None:
    try:
        data = json.loads(store.get(LEASE_KEY))
        return Holder(**data)
    except NoSuchKey:
        return None
    except (ValueError, TypeError):
        log.warning("the lease object is unreadable; treating the workspace as free")
        return None


class Lease:
    """This mount's claim on the workspace."""

    def __init__(self, store: ObjectStore, cache_dir: str, ttl: float | None = None) -> None:
        self.store = store
        self.ttl = default_ttl() if ttl is None else ttl
        self.cache_dir = cache_dir
        self.mount_id = uuid.uuid4().hex
        self.lost = False  # another mount took the lease over (with --force or after expiry)
        self.usurper = ""  # who took it over, for messages

    def _record(self) -> bytes:
        holder = Holder(socket.gethostname(), os.getpid(), self.mount_id, self.cache_dir,
                        time.time() + self.ttl)
        return json.dumps(asdict(holder)).encode()

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise LeaseError naming the live holder (blocking)."""
        if self.store.put_if_absent(LEASE_KEY, self._record()):
            return
        holder = read_holder(self.store)
        if holder is not None and holder.mount_id == self.mount_id:
            return  # our write landed, its answer was lost, and the client's retry was refused
        if holder is not None and not force:
            live = holder.expires > time.time() and holder.alive_here()
            if live:
                raise LeaseError(
                    f"this workspace is already mounted ({holder.describe()}); unmount it "
                    "there first, or pass --force if that mount is gone for good"
                )
        if holder is not None:
            log.warning("taking over the lease of %s", holder.describe())
        self.store.put(LEASE_KEY, self._record())
        now = read_holder(self.store)
        if now is not None and now.mount_id != self.mount_id:
            raise LeaseError(
                f"another mount took this workspace over at the same moment ({now.describe()}); "
                "unmount it there first"
            )

    def renew(self) -> None:
        """Extend the lease; if someone else took it over, say so loudly and leave it to them.

        Stealing it back would make the two mounts alternate as holders forever; leaving it
        makes the other mount the one that the next `wsfs mount` sees.
        """
        if self.lost:
            return
        holder = read_holder(self.store)
        if holder is None or holder.mount_id != self.mount_id:
            self._lose(holder)
            log.error("another mount took over this workspace's lease (%s); unmount this one: "
                      "its later changes may be overwritten in the store", self.usurper)
            return
        self.store.put(LEASE_KEY, self._record())

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
        raise LeaseError(
            f"another mount took over this workspace ({self.usurper}); this mount no longer "
            "publishes: its unsaved changes stay in its cache dir"
        )

    def release(self) -> None:
        holder = read_holder(self.store)
        if holder is None or holder.mount_id == self.mount_id:
            self.store.delete(LEASE_KEY)
