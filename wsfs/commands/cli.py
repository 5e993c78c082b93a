"""The command line: its verbs (VERBS, the one table of them), user-facing errors, exit codes.

Errors are one sentence on stderr with the fix, and a distinct exit code per kind of failure
(see docs/exit-codes.md); a traceback is a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from .. import __version__
from ..errors import UsageError, WsfsError
from . import options, run, snapshot
from .admin import commands as admin
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


@dataclass(frozen=True, slots=True)
class Verb:
    """One `wsfs VERB`: its line in `wsfs --help`, the function that adds its arguments to
    its parser, and the one that runs it and returns the exit code."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None  # what its --help opens with; else `help`, as a sentence
    epilog: str | None = None
    usage: str | None = None


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
    """The `wsfs` parser: the global flags, then one subparser per entry of VERBS."""
    fmt = _HelpFormatter
    p = _Parser(prog="wsfs", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"wsfs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-vv: debug)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log line format (terminal and the daemon's wsfs.log)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, verb in VERBS.items():
        sp = sub.add_parser(name, help=verb.help, formatter_class=fmt, usage=verb.usage,
                            description=verb.description or verb.help[0].upper()
                            + verb.help[1:] + ".", epilog=verb.epilog)
        verb.arguments(sp)
        # `wsfs mount -v ...` too, not only `wsfs -v mount ...`
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output")
    return p


INIT_OPTIONS = (*options.STORE, "framework", "label", "owner")


def init_arguments(sp: argparse.ArgumentParser) -> None:
    options.add_store(sp, INIT_OPTIONS)


def mount_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("store", metavar="STORE", help=options.STORE_HELP)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help=MOUNTPOINT_HELP)
    sp.add_argument("-f", "--foreground", action="store_true",
                    help="do not daemonize: serve until unmounted (systemd, debugging)")
    options.add_mount_options(sp)


def unmount_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                    help="where the workspace is mounted")
    sp.add_argument("--timeout", default=None, metavar="SECONDS",
                    help="give up waiting after this many seconds (the daemon goes on)")


def fsck_arguments(sp: argparse.ArgumentParser) -> None:
    options.add_store(sp)
    sp.add_argument("--verify-data", action="store_true",
                    help="also download every block and check its checksum")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--at", metavar="WHEN", default=None,
                       help="check only this kept checkpoint: a number, a snapshot name, a "
                       "time (2024-05-01T14:30, 2h ago: the checkpoint before it)")
    which.add_argument("--all", action="store_true",
                       help="check every kept checkpoint (see `wsfs snapshot list`)")


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
    reports = trio.run(lambda: check(store, verify_data=args.verify_data, at=args.at,
                                     every=args.all))
    print("\n\n".join(r.render() for r in reports))
    damaged = [r for r in reports if not r.clean]
    if damaged:
        which = ", ".join(r.title() for r in damaged)
        problems = sum(len(r.damage) for r in damaged)
        files = sum(len(r.damaged_paths) for r in damaged)
        raise DamageError(f"{store.url} is damaged in {which} ({problems} problems, {files} "
                          "files): restore the damaged files from elsewhere, or delete them "
                          "to silence their EIO")
    return 0


STORE_EPILOG = options.variables_help(options.STORE)

# Every verb, in the order `wsfs --help` lists them: the one place a verb is registered.
VERBS: dict[str, Verb] = {
    "init": Verb("create an empty workspace in STORE", init_arguments, cmd_init,
                 epilog=options.variables_help(INIT_OPTIONS)),
    "mount": Verb("mount STORE on MOUNTPOINT", mount_arguments, cmd_mount,
                  description=MOUNT_DESCRIPTION,
                  epilog=MOUNT_EPILOG + options.environment_help(options.MOUNT)),
    "unmount": Verb("flush everything, unmount, wait for the daemon", unmount_arguments,
                    cmd_unmount),
    "fsck": Verb("check STORE's newest checkpoint and its named snapshots against its "
                 "objects (no mount needed)", fsck_arguments, cmd_fsck, epilog=STORE_EPILOG),
    "run": Verb("container entrypoint: mount, run COMMAND, flush and unmount when it ends or "
                "on SIGTERM", run.arguments, run.run, usage=run.USAGE,
                epilog=options.environment_help(options.MOUNT)),
    "status": Verb("what a mount has not saved yet (all mounts without MOUNTPOINT)",
                   admin.status_arguments, admin.cmd_status),
    "sync": Verb("upload everything written to MOUNTPOINT so far, and wait",
                 admin.sync_arguments, admin.cmd_sync),
    "du": Verb("logical and stored size of a workspace, and its largest directories (no "
               "mount needed)", admin.du_arguments, admin.cmd_du, epilog=STORE_EPILOG),
    "ls": Verb("every workspace under s3://BUCKET[/PREFIX], its size and last use",
               admin.ls_arguments, admin.cmd_ls, epilog=STORE_EPILOG),
    "gc": Verb("thin the checkpoints on the schedule and delete objects no kept checkpoint "
               "references (safe while mounted)", admin.gc_arguments, admin.cmd_gc,
               epilog=options.variables_help(admin.GC_OPTIONS)),
    "destroy": Verb("delete a workspace and all its objects (asks for its id)",
                    admin.destroy_arguments, admin.cmd_destroy, epilog=STORE_EPILOG),
    "recover": Verb("copy the files a cache dir holds that the store never got (a stale or "
                    "fenced mount's) into DIR", admin.recover_arguments, admin.cmd_recover,
                    epilog=STORE_EPILOG),
    "snapshot": Verb("name a checkpoint so that it stays, or list the kept ones",
                     snapshot.arguments, snapshot.run, epilog=STORE_EPILOG),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..logs import configure

    configure(args.verbose, args.log_format)
    try:
        options.resolve(args, os.environ)
        return VERBS[args.command].run(args)
    except WsfsError as e:
        print(f"wsfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wsfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
