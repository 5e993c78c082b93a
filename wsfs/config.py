"""What `wsfs mount` was told: the mount configuration, shared by the CLI and the daemon."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE_ROOT = Path("/var/cache/wsfs")


@dataclass
class MountConfig:
    """Everything `wsfs mount` was told (see `wsfs mount --help` for the meaning)."""

    store_url: str
    mountpoint: Path
    cache_dir: Path | None = None
    cache_size: int = 10 << 30
    dirty_limit: int = 2 << 30
    flush_delay: float = 5.0
    foreground: bool = False
    fuse_options: set[str] = field(default_factory=set)
    read_only: bool = False
    fsync_remote: bool = False
    unmount_timeout: float = 600.0
    read_timeout: float = 60.0
    enospc_timeout: float = 60.0
    cache_timeout: float = 300.0
    endpoint_url: str | None = None
    region: str | None = None
    init: bool = False
    framework: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    owner: tuple[int, int] | None = None  # with init: of the root directory (None: ours)
    force: bool = False
    nonempty: bool = False
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint, off when None


def default_cache_dir(store_url: str) -> Path:
    return DEFAULT_CACHE_ROOT / hashlib.sha256(store_url.encode()).hexdigest()[:16]
