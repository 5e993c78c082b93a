"""Who may write this workspace now: a lease object in the store, renewed while mounted.

Two writers of one workspace would each publish checkpoints that ignore the other's, so a
second mount is refused while a live lease names someone else. The lease is created with a
conditional write (`put_if_absent`) where the store supports it; taking over an expired or dead
holder's lease is an overwrite, so two mounts racing to take over the same expired lease within
one round trip could both win: that window is documented, and `--force` exists for operators
who know the holder is gone.
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
from .store import NoSuchKey, ObjectStore

log = logging.getLogger(__name__)

LEASE_KEY = "lease"
LEASE_TTL = 60.0


@dataclass(frozen=True, slots=True)
class Holder:
    host: str
    pid: int
    mount_id: str
    cache_dir: str
    expires: float

    def alive_here(self) -> bool:
        """Whether the holder is a live process on this host (false for other hosts)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

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

    def __init__(self, store: ObjectStore, cache_dir: str, ttl: float = LEASE_TTL) -> None:
        self.store = store
        self.ttl = ttl
        self.cache_dir = cache_dir
        self.mount_id = uuid.uuid4().hex

    def _record(self) -> bytes:
        holder = Holder(socket.gethostname(), os.getpid(), self.mount_id, self.cache_dir,
                        time.time() + self.ttl)
        return json.dumps(asdict(holder)).encode()

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise LeaseError naming the live holder (blocking)."""
        if self.store.put_if_absent(LEASE_KEY, self._record()):
            return
        holder = read_holder(self.store)
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

    def renew(self) -> None:
        """Extend the lease; if someone else took it, say so loudly and keep going."""
        holder = read_holder(self.store)
        if holder is not None and holder.mount_id != self.mount_id:
            log.error("another mount took over this workspace's lease (%s)", holder.describe())
        self.store.put(LEASE_KEY, self._record())

    def release(self) -> None:
        holder = read_holder(self.store)
        if holder is None or holder.mount_id == self.mount_id:
            self.store.delete(LEASE_KEY)
