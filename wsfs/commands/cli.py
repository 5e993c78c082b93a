"""The command line: argument parsing, user-facing errors and exit codes.

Errors are one sentence on stderr with the fix, and a distinct exit code per kind of failure
(see docs/exit-codes.md); a traceback is a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import trio

from .. import __version__
from ..errors import UsageError, WsfsError
from . import options
from .options import parse_seconds

log = logging.getLogger(__name__)

DESCRIPTION = """\
wsfs mounts a workspace kept in S3-compatible object storage as a local directory. Writes land
on local disk first (the cache dir) and are uploaded in the background; unmounting uploads
the rest. A mount on another machine sees the whole tree at once.
"""
EPILOG = """\
examples:
  wsfs init s3://my-bucket/ws/alice
  wsfs mount s3://my-bucket/ws/alice /workspace
  wsfs status /workspace
  wsfs unmount /workspace

`wsfs COMMAND --help` describes each command. Exit codes: docs/exit-codes.md.
"""
MOUNT_DESCRIPTION = """\
Mount STORE on MOUNTPOINT and return once the workspace serves. A daemon serves it in the
background, logging to CACHE_DIR/wsfs.log; `wsfs unmount MOUNTPOINT` uploads what is left and
stops it.
"""
MOUNT_EPILOG = """\
examples:
  wsfs mount s3://my-bucket/ws/alice /workspace
  wsfs mount --cache-size 5G -o allow_other,fsync=remote s3://my-bucket/ws/alice /workspace
  WSFS_ENDPOINT_URL=https://s3.gra.io.cloud.ovh.net WSFS_REGION=gra \\
      wsfs mount --init s3://my-bucket/ws/alice /workspace

"""
MOUNTPOINT_HELP = ("an existing empty directory where the workspace appears; `wsfs unmount "
                   "MOUNTPOINT` uploads the rest and unmounts it")
STORE_HELP = ("where the workspace lives: s3://BUCKET[/PREFIX], or file:///ABS/DIR for a "
              "store in a local directory")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `wsfs: ...` sentence and exit 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(UsageError.exit_code, f"wsfs: {message}; see `{self.prog} --help`\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); a default shown where
    it says something (not None, False or []) and the help does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or "default" in text
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = _Parser(prog="wsfs", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"wsfs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-vv: debug)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log line format (terminal and the daemon's wsfs.log)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("store", metavar="STORE", help=STORE_HELP)
        options.add_flags(sp, options.STORE)
        sp.epilog = options.variables_help(options.STORE)

    init_options = (*options.STORE, "framework", "label", "owner")
    sp = sub.add_parser("init", help="create an empty workspace in STORE", formatter_class=fmt,
                        epilog=options.variables_help(init_options))
    sp.add_argument("store", metavar="STORE", help=STORE_HELP)
    options.add_flags(sp, init_options)

    sp = sub.add_parser("mount", help="mount STORE on MOUNTPOINT", formatter_class=fmt,
                        description=MOUNT_DESCRIPTION,
                        epilog=MOUNT_EPILOG + options.environment_help(options.MOUNT))
    sp.add_argument("store", metavar="STORE", help=STORE_HELP)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help=MOUNTPOINT_HELP)
    sp.add_argument("-f", "--foreground", action="store_true",
                    help="do not daemonize: serve until unmounted (systemd, debugging)")
    sp.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="comma-separated mount options: the wsfs options below as NAME=VALUE "
                    "(cache_size=5G), FUSE options (allow_other, noatime, ...); mount(8)'s "
                    "own (_netdev, noauto, x-systemd.*, ...) are ignored")
    options.add_flags(sp, options.MOUNT)
    mount_parser = sp

    sp = sub.add_parser("unmount", help="flush everything, unmount, wait for the daemon",
                        formatter_class=fmt)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                    help="where the workspace is mounted")
    sp.add_argument("--timeout", default=None, metavar="SECONDS",
                    help="give up waiting after this many seconds (the daemon goes on)")

    sp = sub.add_parser("fsck", help="check STORE's newest checkpoint against its objects "
                        "(no mount needed)", formatter_class=fmt)
    store_args(sp)
    sp.add_argument("--verify-data", action="store_true",
                    help="also download every block and check its checksum")
    from .run import add_parser as add_run_parser

    add_run_parser(sub, mount_parser, fmt)
    from .admin.commands import add_parsers as add_admin_parsers

    COMMANDS.update(add_admin_parsers(sub, store_args, fmt))
    for choice in sub._choices_actions:  # each command's --help opens with what it does
        sp = sub.choices[choice.dest]
        sp.description = sp.description or (choice.help[0].upper() + choice.help[1:] + "."
                                             if choice.help else None)
    for sp in sub.choices.values():  # `wsfs mount -v ...` too, not only `wsfs -v mount ...`
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output")
    return p


def cmd_init(args: argparse.Namespace) -> int:
    from ..daemon.workspace import create
    from ..store import open_store, probe

    owner = args.owner or (os.getuid(), os.getgid())
    store = open_store(args.store, endpoint_url=args.endpoint_url, region=args.region)
    probe(store)
    sb = trio.run(lambda: create(store, framework=args.framework, labels=args.label,
                                 owner=owner))
    print(f"created workspace {sb.workspace_id} in {store.url}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from .credentials import use_credentials
    from .mount import exit_parent, mount

    cfg = options.mount_config(args)
    use_credentials(cfg.credentials_file, cfg.profile)
    mount(cfg)
    if not cfg.foreground:
        exit_parent(0)  # the daemon serves: nothing left to do but a slow interpreter teardown
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    return run(args)


def cmd_unmount(args: argparse.Namespace) -> int:
    from .unmount import unmount

    timeout = None if args.timeout is None else parse_seconds(args.timeout, "--timeout")
    unmount(args.mountpoint, progress=sys.stderr.isatty(), timeout=timeout)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from ..errors import DamageError
    from ..store import open_store, probe
    from .fsck import check

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
    args = build_parser().parse_args(argv)
    from ..logs import configure

    configure(args.verbose, args.log_format)
    try:
        options.resolve(args, os.environ)
        return COMMANDS[args.command](args)
    except WsfsError as e:
        print(f"wsfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wsfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
