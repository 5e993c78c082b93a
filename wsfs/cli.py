"""The command line: argument parsing, user-facing errors and exit codes.

Errors are one sentence on stderr with the fix, and a distinct exit code per kind of failure
(see docs/exit-codes.md); a traceback is a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import trio

from . import __version__
from .errors import UsageError, WsfsError

if TYPE_CHECKING:
    from .config import MountConfig

log = logging.getLogger(__name__)

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# FUSE and mount(8) options passed through to the kernel as they are.
FUSE_FLAGS = {"allow_other", "allow_root", "auto_unmount", "suid", "nosuid", "dev", "nodev",
              "exec", "noexec", "atime", "noatime", "relatime", "sync", "async",
              "dirsync"}
# mount(8)/fstab/systemd options that mean nothing to the filesystem itself.
IGNORED = {"defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev",
           "owner", "group", "comment",
           "default_permissions"}  # (wsfs always mounts with it)


def parse_size(text: str) -> int:
    """Parse '10G', '512M', '1.5T', '4096' (binary units) into bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{text!r} is not a size; write it like 512M, 10G or 1T")
    value = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"the size {text!r} must be more than zero")
    return value


def parse_seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number of seconds, not {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise UsageError(f"{what} must be zero or more seconds, not {text!r}")
    return value


def parse_timeout(text: str, what: str) -> float:
    """Seconds that must be more than zero (a zero read timeout would fail every read)."""
    value = parse_seconds(text, what)
    if value <= 0:
        raise UsageError(f"{what} must be more than zero seconds, not {text!r}")
    return value


def parse_dir(text: str, what: str) -> Path:
    """A directory argument: an empty one is refused, since Path("") is the working
    directory, which nobody means."""
    if not text:
        raise UsageError(f"{what} needs a directory, not an empty value")
    return Path(text)


def parse_owner(text: str, what: str) -> tuple[int, int]:
    """UID:GID in numbers: names would be looked up on this machine, not where it is used."""
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m:
        raise UsageError(f"{what} must be UID:GID in numbers, not {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"the label {text!r} must be written KEY=VALUE")
    return key, value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `wsfs: ...` sentence and exit 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(UsageError.exit_code, f"wsfs: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="wsfs", description=__doc__.splitlines()[0] if __doc__
                                else None, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"wsfs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log line format (terminal and the daemon's wsfs.log)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("store", metavar="STORE",
                        help="s3://BUCKET[/PREFIX] or file:///ABS/DIR (the embedded store)")
        sp.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
        sp.add_argument("--region", default=None, help="S3 region (default: from AWS config)")

    sp = sub.add_parser("init", help="create an empty workspace in STORE", formatter_class=fmt)
    store_args(sp)
    sp.add_argument("--framework", default=None, help="framework recorded in the marker")
    sp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="label recorded in the marker (repeatable)")
    sp.add_argument("--owner", default=None, metavar="UID:GID",
                    help="owner of the root directory (default: the caller)")

    sp = sub.add_parser("mount", help="mount STORE on MOUNTPOINT", formatter_class=fmt)
    store_args(sp)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    sp.add_argument("--cache-dir", default=None,
                    help="local cache directory (default: /var/cache/wsfs/<hash of STORE>)")
    sp.add_argument("--cache-size", default="10G", help="limit of the clean block cache")
    sp.add_argument("--dirty-limit", default="2G",
                    help="dirty bytes at which writers wait for uploads")
    sp.add_argument("--flush-delay", default="5",
                    help="seconds a change may wait before it is uploaded")
    sp.add_argument("--unmount-timeout", default="600",
                    help="seconds the final flush may retry an unreachable store")
    sp.add_argument("--read-timeout", default="60",
                    help="seconds a read of uncached data may wait for an unreachable store "
                    "before it fails with EIO")
    sp.add_argument("--enospc-timeout", default="60",
                    help="seconds a writer waits on a full cache disk, with no space freed, "
                    "before it gets ENOSPC")
    sp.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    sp.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="comma-separated mount options: FUSE options (allow_other, ro, ...) "
                    "and wsfs ones (cache_dir=, cache_size=, flush_delay=, fsync=local|remote, "
                    "endpoint_url=, region=, unmount_timeout=, read_timeout=, enospc_timeout=, "
                    "dirty_limit=, metrics=)")
    sp.add_argument("--init", action="store_true",
                    help="create the workspace if STORE holds none")
    sp.add_argument("--framework", default=None, help="with --init: framework in the marker")
    sp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="with --init: label in the marker")
    sp.add_argument("--owner", default=None, metavar="UID:GID",
                    help="with --init: owner of the root directory (default: the mounting user)")
    sp.add_argument("--force", action="store_true",
                    help="take the workspace over even if another mount holds its lease")
    sp.add_argument("--metrics", default=None, metavar="ADDR:PORT",
                    help="serve Prometheus metrics on http://ADDR:PORT/metrics (off by default)")
    mount_parser = sp

    sp = sub.add_parser("unmount", help="flush everything, unmount, wait for the daemon",
                        formatter_class=fmt)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    sp.add_argument("--timeout", default=None,
                    help="give up waiting after this many seconds (the daemon goes on)")

    sp = sub.add_parser("fsck", help="check STORE's newest checkpoint against its objects "
                        "(no mount needed)", formatter_class=fmt)
    store_args(sp)
    sp.add_argument("--verify-data", action="store_true",
                    help="also download every block and check its checksum")
    from .entrypoint import add_parser as add_run_parser

    add_run_parser(sub, mount_parser, fmt)
    from .admin.commands import add_parsers as add_admin_parsers

    COMMANDS.update(add_admin_parsers(sub, store_args, fmt))
    for sp in sub.choices.values():  # `wsfs mount -v ...` too, not only `wsfs -v mount ...`
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output")
    return p


def apply_options(cfg: object, opts: list[str]) -> None:
    """Fold `-o a,b=c` options into the mount configuration."""
    from .config import MountConfig

    assert isinstance(cfg, MountConfig)
    for group in opts:
        for opt in filter(None, (o.strip() for o in group.split(","))):
            key, sep, value = opt.partition("=")
            if key in IGNORED or key.startswith("x-"):
                continue
            if key in ("ro", "rw") and not sep:  # the last one wins, as for mount(8)
                cfg.read_only = key == "ro"
            elif key in FUSE_FLAGS and not sep:
                cfg.fuse_options.add(key)
            elif key == "nonempty":
                cfg.nonempty = True
            elif key == "cache_dir" and sep:
                cfg.cache_dir = parse_dir(value, "-o cache_dir=")
            elif key == "cache_size" and sep:
                cfg.cache_size = parse_size(value)
            elif key == "dirty_limit" and sep:
                cfg.dirty_limit = parse_size(value)
            elif key == "flush_delay" and sep:
                cfg.flush_delay = parse_seconds(value, "flush_delay")
            elif key == "unmount_timeout" and sep:
                cfg.unmount_timeout = parse_seconds(value, "unmount_timeout")
            elif key == "read_timeout" and sep:
                cfg.read_timeout = parse_timeout(value, "read_timeout")
            elif key == "enospc_timeout" and sep:
                cfg.enospc_timeout = parse_seconds(value, "enospc_timeout")
            elif key == "fsync" and value in ("local", "remote"):
                cfg.fsync_remote = value == "remote"
            elif key == "endpoint_url" and sep:
                cfg.endpoint_url = value
            elif key == "region" and sep:
                cfg.region = value
            elif key == "metrics" and sep:
                cfg.metrics = value
            elif key in ("fsname", "subtype") and sep:
                continue  # wsfs names its mounts itself
            else:
                raise UsageError(f"unknown mount option {opt!r}; see `wsfs mount --help`")


def cmd_init(args: argparse.Namespace) -> int:
    from .store import open_store, probe
    from .workspace import create

    owner = parse_owner(args.owner, "--owner") if args.owner else (os.getuid(), os.getgid())
    labels = dict(parse_label(x) for x in args.label)
    store = open_store(args.store, endpoint_url=args.endpoint_url, region=args.region)
    probe(store)
    sb = trio.run(lambda: create(store, framework=args.framework, labels=labels, owner=owner))
    print(f"created workspace {sb.workspace_id} in {store.url}")
    return 0


def mount_config(args: argparse.Namespace) -> MountConfig:
    """The mount configuration from `wsfs mount` (or `wsfs run`) arguments and -o options."""
    from .config import MountConfig

    cfg = MountConfig(
        store_url=args.store, mountpoint=args.mountpoint,
        cache_dir=None if args.cache_dir is None else parse_dir(args.cache_dir, "--cache-dir"),
        cache_size=parse_size(args.cache_size), dirty_limit=parse_size(args.dirty_limit),
        flush_delay=parse_seconds(args.flush_delay, "--flush-delay"),
        unmount_timeout=parse_seconds(args.unmount_timeout, "--unmount-timeout"),
        read_timeout=parse_timeout(args.read_timeout, "--read-timeout"),
        enospc_timeout=parse_seconds(args.enospc_timeout, "--enospc-timeout"),
        foreground=args.foreground, endpoint_url=args.endpoint_url, region=args.region,
        init=args.init, framework=args.framework,
        labels=dict(parse_label(x) for x in args.label), force=args.force,
        owner=None if args.owner is None else parse_owner(args.owner, "--owner"),
    )
    cfg.metrics = getattr(args, "metrics", None)
    apply_options(cfg, args.options)
    return cfg


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import exit_parent, mount

    cfg = mount_config(args)
    mount(cfg)
    if not cfg.foreground:
        exit_parent(0)  # the daemon serves: nothing left to do but a slow interpreter teardown
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .entrypoint import run

    return run(args)


def cmd_unmount(args: argparse.Namespace) -> int:
    from .unmount import unmount

    timeout = None if args.timeout is None else parse_seconds(args.timeout, "--timeout")
    unmount(args.mountpoint, progress=sys.stderr.isatty(), timeout=timeout)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from .errors import DamageError
    from .fsck import check
    from .store import open_store, probe

    store = open_store(args.store, endpoint_url=args.endpoint_url, region=args.region)
    probe(store)
    report = trio.run(lambda: check(store, verify_data=args.verify_data))
    print(report.render())
    if not report.clean:
        raise DamageError(f"{store.url} is damaged ({len(report.damage)} problems, "
                          f"{len(report.damaged_paths)} files): restore the damaged files "
                          "from elsewhere, or delete them to silence their EIO")
    return 0


COMMANDS = {"init": cmd_init, "mount": cmd_mount, "unmount": cmd_unmount, "run": cmd_run,
            "fsck": cmd_fsck}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import configure

    configure(args.verbose, args.log_format)
    try:
        return COMMANDS[args.command](args)
    except WsfsError as e:
        print(f"wsfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wsfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
