"""`mount.wsfs` / `mount.fuse.wsfs` / `umount.fuse.wsfs`: what mount(8) and umount(8) call.

With `/sbin/mount.fuse.wsfs` installed (packaging/install-mount-helper.sh), an fstab line like

    s3://bucket/ws  /workspace  fuse.wsfs  _netdev,allow_other,cache_dir=/var/cache/wsfs/ws  0 0

works with `mount /workspace`: util-linux runs `mount.fuse.wsfs SOURCE MOUNTPOINT -o OPTIONS`,
and this helper turns that into `wsfs mount SOURCE MOUNTPOINT -o OPTIONS`, which returns once
the filesystem serves. Options only mount(8) or systemd care about (`_netdev`, `noauto`,
`nofail`, `x-systemd.*`, ...) are ignored by `wsfs mount` itself. One default is the helper's:
without `credentials_file=` (an AWS shared-credentials file, mode 0600), it uses
/etc/wsfs/credentials when that exists and the environment names no keys.

mount(8)'s `dev` and `suid` are honoured, `nodev,nosuid` staying the default: libmount 2.38
(Debian 12) hides them from helpers, so they are looked for in what mount(8) was asked
(mount8.py).

`mount -o remount,ro MOUNTPOINT` (or rw, noexec, ...) changes the running mount's kernel flags
(remount.py).

Installed as `/sbin/umount.fuse.wsfs`, the same script makes `umount /workspace` wait for the
final upload like `wsfs unmount` does; without it (or with `umount -i`, `fusermount3 -u`) the
kernel unmounts at once and the daemon finishes its upload alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .. import __version__
from ..errors import MountError, UsageError, WsfsError
from .mount8 import last_of, parent_request
from .remount import remount

DEFAULT_CREDENTIALS = Path("/etc/wsfs/credentials")
# Variables that say where the keys are: with any of them, /etc/wsfs/credentials is not used.
KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SHARED_CREDENTIALS_FILE", "WSFS_CREDENTIALS_FILE")
HELP = """\
usage: {prog} STORE MOUNTPOINT [-sfnv] [-o OPTIONS]

What mount(8) runs for a `fuse.wsfs` line of /etc/fstab or `mount -t fuse.wsfs STORE
MOUNTPOINT`: it runs `wsfs mount STORE MOUNTPOINT -o OPTIONS` and returns once the workspace
serves. OPTIONS are those of `wsfs mount` (see `wsfs mount --help`) and the FUSE ones
(allow_other, ro, ...); mount(8)'s and systemd's own (_netdev, nofail, x-systemd.*) are
ignored. `-o remount,ro` (or rw, ...) changes a mounted workspace's kernel flags. Without
credentials_file=, /etc/wsfs/credentials is used when it exists and the environment names no
keys.

  -o OPTIONS     comma-separated mount options
  -v             more log output
  -f             do everything but the mount (mount -f)
  -s, -n         accepted and ignored
  -h, --help     this help
  -V, --version  the version
"""
UMOUNT_HELP = """\
usage: {prog} MOUNTPOINT [-lv]

What umount(8) runs for a fuse.wsfs mount: like `wsfs unmount MOUNTPOINT`, it unmounts and
returns only once the daemon has uploaded everything (its exit status says whether it did).

  -l             lazy: detach at once, the daemon uploads the rest alone
  -v             more log output
  -h, --help     this help
  -V, --version  the version
"""


def parse_mount_args(argv: list[str]) -> tuple[str, str, list[str], bool, bool]:
    """Parse `SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTS] [-t TYPE]` as mount(8) passes them.

    Returns the source, mountpoint, options, verbose and fake (`-f`: do nothing).
    """
    positional: list[str] = []
    options: list[str] = []
    verbose = fake = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-o", "-t", "-N"):
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs a value")
            if arg == "-o":
                options.append(argv[i + 1])
            elif arg == "-N":
                raise UsageError("wsfs cannot mount in another namespace (-N); run mount "
                                 "inside that namespace instead")
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "v":
                    verbose = True
                elif flag == "f":
                    fake = True
                elif flag not in "sn":  # -s sloppy, -n no mtab: nothing to do for wsfs
                    raise UsageError(f"unknown mount helper flag -{flag}")
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise UsageError("usage: mount.wsfs STORE MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = positional
    source = source.removeprefix("wsfs#")  # the old `fuse` type's "subtype#source" form
    return source, mountpoint, options, verbose, fake


def with_default_credentials(options: list[str]) -> list[str]:
    """The options, plus credentials_file=/etc/wsfs/credentials when nothing names the keys."""
    given = any(o.strip().partition("=")[0] == "credentials_file"
                for group in options for o in group.split(","))
    if (given or any(v in os.environ for v in KEY_VARIABLES)
            or not DEFAULT_CREDENTIALS.exists()):
        return options
    return [*options, f"credentials_file={DEFAULT_CREDENTIALS}"]


def hidden_flags(opts: list[str], request: list[str]) -> list[str]:
    """`dev` and `suid` where mount(8) was asked for them but the helper's options say
    neither them nor their opposite (libmount before 2.39 drops them: mount8.py)."""
    return [yes for no, yes in (("nodev", "dev"), ("nosuid", "suid"))
            if last_of(opts, no, yes) is None and last_of(request, no, yes) == yes]


def mount_main(argv: list[str]) -> int:
    from .cli import main as cli_main

    try:
        source, mountpoint, options, verbose, fake = parse_mount_args(argv)
    except WsfsError as e:
        print(f"mount.wsfs: {e}", file=sys.stderr)
        return e.exit_code
    if fake:
        return 0
    opts = [o.strip() for group in options for o in group.split(",") if o.strip()]
    request = parent_request(os.path.normpath(os.path.abspath(mountpoint)))
    if "remount" in opts:
        try:
            remount(os.path.realpath(mountpoint), opts, request)
        except WsfsError as e:
            print(f"mount.wsfs: {e}", file=sys.stderr)
            return e.exit_code
        return 0
    options = [*options, *hidden_flags(opts, request)]
    args = ["-v"] if verbose else []
    args += ["mount", source, mountpoint]
    options = with_default_credentials(options)
    if options:
        args += ["-o", ",".join(options)]
    return cli_main(args)


def _fusermount(flag: str, mountpoint: Path) -> int:
    """Unmount without waiting; fusermount3 says why it failed, the code is ours (busy or
    not mounted: MountError's, as for `wsfs unmount`)."""
    failed = subprocess.run(["fusermount3", flag, str(mountpoint)]).returncode != 0
    return MountError.exit_code if failed else 0


def umount_main(argv: list[str]) -> int:
    """`umount.fuse.wsfs MOUNTPOINT [-flnrv] [-N NS] [-t TYPE]`: unmount and wait for the flush."""
    from ..runtime import canonical_mountpoint, registry_path
    from .cli import main as cli_main

    positional = [a for i, a in enumerate(argv)
                  if not a.startswith("-") and (i == 0 or argv[i - 1] not in ("-t", "-N"))]
    flags = "".join(a[1:] for a in argv if a.startswith("-") and a not in ("-t", "-N"))
    if len(positional) != 1:
        print("umount.wsfs: usage: umount.wsfs MOUNTPOINT", file=sys.stderr)
        return UsageError.exit_code
    mountpoint = canonical_mountpoint(Path(positional[0]))
    if "l" in flags:  # lazy: detach now, the daemon uploads alone
        return _fusermount("-uz", mountpoint)
    if not registry_path(mountpoint).exists():
        # Mounted under another WSFS_RUN_DIR, or not by wsfs: unmount without waiting.
        print(f"umount.wsfs: {mountpoint} is not registered in {registry_path(mountpoint).parent}"
              "; unmounting without waiting for the upload", file=sys.stderr)
        return _fusermount("-u", mountpoint)
    return cli_main((["-v"] if "v" in flags else []) + ["unmount", str(mountpoint)])


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the name we were called by: mount.* or umount.*."""
    argv = sys.argv if argv is None else argv
    prog = Path(argv[0]).name
    if "-h" in argv[1:] or "--help" in argv[1:]:
        text = UMOUNT_HELP if prog.startswith("umount.") else HELP
        print(text.format(prog=prog), end="")
        return 0
    if "-V" in argv[1:] or "--version" in argv[1:]:
        print(f"{prog} (wsfs {__version__})")
        return 0
    if prog.startswith("umount."):
        return umount_main(argv[1:])
    return mount_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
