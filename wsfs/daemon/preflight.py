"""What a mount needs of this machine, checked before the lease is taken or anything written.

A mount that fails after taking the lease costs the workspace a stale lease at best, so every
condition that can be known up front is checked in the `wsfs mount` process itself: the FUSE
device and the right to mount (`/dev/fuse`, `fusermount3`, CAP_SYS_ADMIN for root), and where
the cache dir would live (never on FUSE or a network filesystem, never inside a wsfs mount).
Each failure is one sentence with the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import MountError
from ..runtime import mount_of

FUSE_DEVICE = Path("/dev/fuse")
CAP_SYS_ADMIN = 21  # the capability's bit in /proc/self/status's CapEff

# Where a cache dir must not live. It needs fsync(2) that reaches a local disk before wsfs lets
# a block go (the store is the only other copy), flock(2) that keeps a second daemon out, and
# a life independent of any other mount: on FUSE (sshfs, s3fs, another wsfs, ...) or a network
# filesystem, fsync and locks are only as good as a remote server, and it can vanish under
# the mount. overlay (the root of a Docker container) and tmpfs are local, and allowed.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre",
    "gpfs", "beegfs", "ncpfs", "coda", "davfs", "orangefs", "pvfs2",
})


def in_container() -> bool:
    """Whether this process looks like it runs in a container (Docker, Podman, Kubernetes)."""
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return True
    # systemd-nspawn and Podman set $container (lower case, by convention)
    if os.environ.get("container") or os.environ.get("KUBERNETES_SERVICE_HOST"):  # noqa: SIM112
        return True
    try:
        cgroups = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return any(word in cgroups for word in ("docker", "kubepods", "containerd", "libpod"))


CONTAINER_FIX = "start the container with `--device /dev/fuse --cap-add SYS_ADMIN`"


def effective_capabilities() -> int:
    """This process's effective capability set (CapEff of /proc/self/status), -1 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return -1


def check_fuse() -> None:
    """Refuse, with the fix, a machine or container where no FUSE mount can work.

    libfuse opens /dev/fuse as the caller, whoever it is (only then does a user other than
    root fall back to the setuid `fusermount3` for the mount itself), so the device must
    exist and open for reading and writing. Root mounts with mount(2), which needs
    CAP_SYS_ADMIN (Docker withholds it, and the device, unless asked). `fusermount3` is
    needed by root too: the daemon unmounts itself with it on SIGTERM.
    """
    if not FUSE_DEVICE.exists():
        fix = CONTAINER_FIX if in_container() else "load the FUSE module with `modprobe fuse`"
        raise MountError(f"{FUSE_DEVICE} is missing: {fix}")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is missing: install the fuse3 package "
                         "(`apt-get install fuse3`)")
    root = os.geteuid() == 0
    caps = effective_capabilities()
    if root and caps != -1 and not caps >> CAP_SYS_ADMIN & 1:
        raise MountError("this process lacks CAP_SYS_ADMIN, which mounting needs: "
                         + ("start the container with `--cap-add SYS_ADMIN`" if in_container()
                            else "run wsfs mount with full root privileges"))
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        if e.errno == errno.EACCES and not root:
            fix = (f"let this user read and write it (`chmod 666 {FUSE_DEVICE}`, as Debian's "
                   "udev rule does) or mount as root")
        elif in_container():
            fix = CONTAINER_FIX
        else:
            fix = f"check {FUSE_DEVICE}'s permissions"
        raise MountError(f"{FUSE_DEVICE} cannot be opened ({e.strerror}): {fix}") from None


def nearest_existing(path: Path) -> Path:
    """`path`, or its deepest ancestor that exists, resolved (symlinks followed). A path that
    is there but cannot be looked at (a dead FUSE mount: ENOTCONN) counts as existing."""
    for p in (path, *path.parents):
        try:
            p.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            pass
        return Path(os.path.realpath(p))
    return Path("/")


def check_cache_location(cache: Path) -> None:
    """Refuse a cache dir on FUSE (another wsfs mount above all) or a network filesystem,
    before anything is created there."""
    where = mount_of(nearest_existing(cache))
    if where is None:
        return
    fstype = where.fstype
    if fstype == "fuse.wsfs":
        raise MountError(
            f"the cache dir {cache} is inside the wsfs mount {where.mountpoint}: its blocks "
            "would be uploaded into that workspace, which could then never be unmounted; "
            "choose a --cache-dir on a local disk")
    if fstype in ("fuse", "fuseblk") or fstype.startswith("fuse."):
        kind = "a FUSE filesystem"
    elif fstype in NETWORK_FILESYSTEMS:
        kind = "a network filesystem"
    else:
        return
    raise MountError(
        f"the cache dir {cache} is on {kind} ({fstype}, mounted on {where.mountpoint}), "
        "whose fsync and locks wsfs cannot rely on to keep unsaved data; choose a "
        "--cache-dir on a local disk")


def apparmor_profile() -> str:
    """The AppArmor profile confining this process, like 'docker-default (enforce)'; '' without
    AppArmor. (The older attr/current is another LSM's, SELinux's say, unless AppArmor is in.)"""
    paths = ["/proc/self/attr/apparmor/current"]
    if Path("/sys/module/apparmor").exists():
        paths.append("/proc/self/attr/current")
    for path in paths:
        try:
            return Path(path).read_text().strip("\0\n ")
        except OSError:
            continue
    return ""


def refusal_fix(why: str) -> str:
    """The fix to append to 'the kernel refused to mount X (why)', '' when none is known.

    A refusal that `check_fuse` could not foresee: in a container, Docker's default AppArmor
    profile denies mount(2) even with CAP_SYS_ADMIN."""
    if "mount failed" not in why or not any(w in why for w in ("not permitted",
                                                                "Permission denied")):
        return ""  # e.g. "bad mount point ...: Permission denied" is the mountpoint's
    profile = apparmor_profile()
    if profile.endswith("(enforce)"):
        fix = ("start the container with `--security-opt apparmor=unconfined`" if in_container()
               else "run wsfs unconfined")
        return f": the AppArmor profile {profile.split()[0]} may forbid mounting; {fix}"
    if in_container():
        return f": {CONTAINER_FIX}"
    return ""
