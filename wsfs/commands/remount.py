"""`mount -o remount,ro MOUNTPOINT` (and `remount,rw`, `remount,noexec`, ...) of a wsfs mount.

mount(8) hands a remount to the helper like a mount, with `remount` among the options.
mount.fuse3 passes it on to the filesystem's program, and under libfuse that fails ("unknown
option remount"). FUSE has no request for a remount: it is the kernel's alone. Its mount(2)
with MS_REMOUNT first syncs the filesystem (the dirty pages it holds go to the daemon, which
uploads them as usual) and then sets the flags; on a read-only superblock the VFS refuses
every write, create, unlink, setattr, ... with EROFS before it reaches the daemon, and a
switch to read-only is refused (EBUSY) while a file is open for writing. So the helper makes
that mount(2) call itself. A mount started read-only (`-o ro`) is a view of the workspace's
checkpoints without the lease (daemon/view.py): it is never switched to read-write.

The options the helper gets are the fstab line's (when mount(8) found one) or the mount's
current ones, plus the command line's. Each kernel flag not named keeps the mount's current
state, so a remount never widens `nosuid,nodev` by leaving them out; `dev` and `suid` are
honoured when asked even where libmount hides them (mount8.py). wsfs's own options keep the
values the mount started with.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Set as AbstractSet
from pathlib import Path

from ..errors import MountError, UsageError
from ..runtime import read_registry, registry_path, wsfs_mount_options
from . import options
from .mount8 import last_of

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_REMOUNT = 32
MS_NOATIME, MS_NODIRATIME = 1024, 2048
MS_RELATIME = 1 << 21
# (on, off, MS flag): the flags a remount sets; the per-mount ones, and sync of the superblock
PAIRS = (("ro", "rw", MS_RDONLY), ("nosuid", "suid", MS_NOSUID), ("nodev", "dev", MS_NODEV),
         ("noexec", "exec", MS_NOEXEC), ("sync", "async", MS_SYNCHRONOUS))
ATIME = {"noatime": MS_NOATIME, "relatime": MS_RELATIME, "nodiratime": MS_NODIRATIME}
# What the kernel shows of a FUSE mount in mountinfo, and mount(8) hands back on a remount.
FUSE_MOUNT_OPTIONS = ("user_id=", "group_id=", "rootmode=", "max_read=", "blksize=", "fd=",
                      "default_permissions", "allow_other", "allow_root", "auto_unmount")


def remount_flags(opts: list[str], request: list[str],
                  mounted: tuple[AbstractSet[str], AbstractSet[str]]) -> int:
    """The mount(2) flags for remounting with `opts` (the helper's), `request` (what mount(8)
    was asked, for the options it hides) and `mounted` (the current per-mount and superblock
    options). Refused and unknown options raise UsageError."""
    own = {o.key for o in options.OPTIONS} | {o.o_off for o in options.OPTIONS if o.o_off}
    for opt in opts:
        key = opt.partition("=")[0]
        if opt in ATIME or any(x == opt for pair in PAIRS for x in pair[:2]):
            continue
        if key in own or opt == "remount" or any(
                opt == name or (name.endswith("=") and opt.startswith(name))
                for name in FUSE_MOUNT_OPTIONS):
            continue  # wsfs's own: kept as mounted; FUSE's: fixed at the mount
        g = options.generic(opt)
        if g is None:
            raise UsageError(f"unknown mount option {opt!r}; see `wsfs mount --help`")
        if g.action == options.REFUSED:
            raise UsageError(f"the mount option {opt!r} is refused: {g.meaning}")
    per_mount, superblock = mounted
    flags = MS_REMOUNT
    for on, off, flag in PAIRS:
        said = last_of(opts, on, off)
        if said is None and off in ("dev", "suid") and last_of(request, on, off) == off:
            said = off  # asked, but hidden by libmount (mount8.py)
        if said is None:  # not named: as the mount is now
            said = on if on in (per_mount | superblock) else off
        if said == on:
            flags |= flag
    for name, flag in ATIME.items():
        if name in opts:
            flags |= flag
    return flags


def remount(target: str, opts: list[str], request: list[str]) -> None:
    """Change the kernel's flags of the wsfs mount on `target`, or raise why not."""
    mounted = wsfs_mount_options(target)
    if mounted is None:
        raise MountError(f"{target} is not a wsfs mount: nothing to remount")
    flags = remount_flags(opts, request, mounted)
    reg = read_registry(registry_path(Path(target)))
    if reg is not None and reg.get("view") and not flags & MS_RDONLY:
        raise MountError(f"{target} is a read-only mount of the workspace's checkpoints "
                         "(mounted with ro): it cannot be switched to read-write; unmount it "
                         "and mount it without ro")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(None, os.fsencode(target), None, ctypes.c_ulong(flags), None) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and flags & MS_RDONLY:
        raise MountError(f"cannot remount {target} read-only: a file is open for writing "
                         f"there; close it (`fuser -vm {target}` lists who) and try again")
    raise MountError(f"the kernel refused to remount {target} ({os.strerror(err)})")
