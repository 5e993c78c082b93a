"""What `wsfs mount` was told: the mount configuration, shared by the CLI and the daemon; and
the one parser of a number of seconds, for the options and the WSFS_ knobs alike."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE_ROOT = Path("/var/cache/wsfs")


@dataclass
class MountConfig:
    """Everything `wsfs mount` was told. The options' meanings and defaults are in one table,
    wsfs/commands/options.py: the fields without a default here are its options, all set by
    the CLI."""

    store_url: str
    mountpoint: Path
    endpoint_url: str | None
    region: str | None
    profile: str | None
    credentials_file: Path | None
    cache_dir: Path | None
    cache_size: int
    dirty_limit: int
    flush_delay: float
    fsync_remote: bool
    unmount_timeout: float
    handover_timeout: float
    read_timeout: float
    enospc_timeout: float
    read_only: bool
    at: str | None  # read-only: the past state to mount, as given (WHEN)
    refresh: float  # read-only, following: seconds between looks for a newer checkpoint
    nonempty: bool
    metrics: str | None  # ADDR:PORT of the Prometheus endpoint, off when None
    force: bool
    init: bool
    framework: str | None
    labels: dict[str, str]
    owner: tuple[int, int] | None  # with init: of the root directory (None: ours)
    keep: str  # the retention schedule, checked (meta/retention.py parses it)
    foreground: bool = False
    fuse_options: set[str] = field(default_factory=set)
    cache_timeout: float = 300.0


def default_cache_dir(store_url: str) -> Path:
    """/var/cache/wsfs/<hash of the store URL> for root; for any other user, who cannot write
    there, the same under $XDG_CACHE_HOME/wsfs (else ~/.cache/wsfs), as the XDG base
    directory spec has it (a relative $XDG_CACHE_HOME is ignored)."""
    key = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    if os.geteuid() == 0:
        return DEFAULT_CACHE_ROOT / key
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "wsfs" / key


def default_view_cache_dir(store_url: str, mountpoint: Path) -> Path:
    """A read-only mount's own cache dir (`wsfs mount -o ro`): `views/<hash of the store URL
    and the mountpoint>` beside the writers' default ones, never a writer's (which holds the
    metadata and data no checkpoint has yet), and one per mountpoint, so that views of one
    store can be mounted side by side."""
    key = hashlib.sha256(f"{store_url}\0{mountpoint}".encode()).hexdigest()[:16]
    return default_cache_dir(store_url).parent / "views" / key


def parse_seconds(text: str, *, signed: bool = False) -> float:
    """Seconds written as a plain number ('5', '0.5', '1e3'): finite, and zero or more unless
    `signed`. A ValueError says what is wrong ("must be ... seconds") for the caller to
    complete with where the text came from."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(value) or (value < 0 and not signed):
        raise ValueError("must be zero or more seconds")
    return value


def env_seconds(name: str, default: float, *, positive: bool = False,
                signed: bool = False) -> float:
    """Seconds from $name (`parse_seconds`; more than zero if `positive`), else `default`:
    knobs tests turn to take seconds instead of minutes (a lease's TTL, the reap delay, the
    repack interval, a clock skew)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = parse_seconds(text, signed=signed)
    except ValueError:
        return default
    return default if positive and value <= 0 else value
