"""The command-line verbs that observe and manage workspaces: status, sync, du, ls, gc, destroy,
recover.

Each verb is two plain functions, its arguments and its run, side by side;
`wsfs.commands.cli`'s VERBS table registers them with their help lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ...cachedir import CacheDir
from ...errors import UsageError, WsfsError
from ...store import ObjectStore
from .. import options
from ..options import parse_seconds


class Aborted(WsfsError):
    """The user did not confirm a destructive command."""

    exit_code = 1


def _open(args: argparse.Namespace) -> ObjectStore:
    from ...store import open_store, probe

    store = open_store(args.store, endpoint_url=args.endpoint_url, region=args.region)
    probe(store)
    return store


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str))


def status_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?", default=None,
                    help="where a workspace is mounted (default: every wsfs mount)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def sync_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                    help="where the workspace is mounted")
    sp.add_argument("--timeout", default=None, metavar="SECONDS",
                    help="fail after this many seconds (the daemon keeps trying)")


def du_arguments(sp: argparse.ArgumentParser) -> None:
    options.add_store(sp)
    sp.add_argument("--top", type=int, default=15, metavar="N", help="how many directories to show")
    sp.add_argument("--newest-only", action="store_true",
                    help="measure the newest checkpoint only, not what the older kept ones and "
                    "the named snapshots hold (which reads each of them)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def ls_arguments(sp: argparse.ArgumentParser) -> None:
    options.add_store(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")


GC_OPTIONS = (*options.STORE, "keep")


def gc_arguments(sp: argparse.ArgumentParser) -> None:
    options.add_store(sp, GC_OPTIONS)
    sp.add_argument("--min-age", default="3600", metavar="SECONDS",
                    help="seconds an unreferenced object must have existed before it is "
                    "deleted: a mounted writer's uploads are unreferenced until it publishes")
    sp.add_argument("--dry-run", action="store_true", help="say what would be deleted, only")
    sp.add_argument("--force", action="store_true",
                    help="collect even though the last mount stopped uncleanly (its cache dir "
                    "is known to be gone)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def destroy_arguments(sp: argparse.ArgumentParser) -> None:
    options.add_store(sp)
    sp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sp.add_argument("--force", action="store_true",
                    help="destroy even though a lease says it is mounted (the holder is gone)")


def recover_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("cache_dir", metavar="CACHE_DIR", type=Path,
                    help="the cache dir, e.g. one moved aside as CACHE_DIR.stale-TIME")
    sp.add_argument("--into", metavar="DIR", type=Path, required=True,
                    help="where to write them (any directory, e.g. one inside a mount)")
    sp.add_argument("--store", metavar="STORE", default=None,
                    help="the workspace's store, for blocks uploaded but never published "
                    "(default: the one the cache dir's status.json names)")
    options.add_flags(sp, options.STORE)


def cmd_status(args: argparse.Namespace) -> int:
    from ...daemon.status import show

    text, dead = show(args.mountpoint, as_json=args.json)
    print(text, flush=True)
    if dead is not None:  # after the figures: a script reads both, a person sees the fix
        raise dead
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from ...daemon.status import sync

    timeout = None if args.timeout is None else parse_seconds(args.timeout, "--timeout")
    summary = sync(args.mountpoint, progress=sys.stderr.isatty(), timeout=timeout)
    if sys.stderr.isatty():
        print(summary, file=sys.stderr)
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    from .du import du, format_report

    report = du(_open(args), top=args.top, newest_only=args.newest_only)
    if args.json:
        _print_json(report.to_json())
    else:
        print(format_report(report))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .listing import format_table, list_workspaces, to_json

    infos = list_workspaces(_open(args))
    if args.json:
        _print_json(to_json(infos))
    else:
        print(format_table(infos))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ...meta.retention import Schedule
    from .gc import format_report, gc

    report = gc(_open(args), min_age=parse_seconds(args.min_age, "--min-age"),
                dry_run=args.dry_run, force=args.force, keep=Schedule.parse(args.keep))
    if args.json:
        _print_json(report.to_json())
    else:
        print(format_report(report))
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from . import destroy as d

    store = _open(args)

    def confirm(workspace_id: str) -> bool:
        if args.yes:
            return True
        print(f"This deletes workspace {workspace_id} and every object of it in {store.url}; "
              "it cannot be undone.", file=sys.stderr)
        print("Type the workspace id to confirm: ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip()
        return answer == workspace_id

    try:
        report = d.destroy(store, confirm=confirm, force=args.force)
    except d.Aborted:
        raise Aborted("nothing deleted: the workspace id was not confirmed (type it exactly, "
                      "or pass --yes)") from None
    print(f"destroyed workspace {report.workspace_id}: deleted {report.objects} objects "
          f"from {report.store}")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from ...daemon.conflicts import export
    from ...meta.superblock import DEFAULT_BLOCK_SIZE, read_superblock

    cache_dir: Path = args.cache_dir
    layout = CacheDir(cache_dir)
    if not layout.meta_db.is_file():
        raise UsageError(f"{cache_dir} holds no wsfs metadata (meta.db): give a cache dir, "
                         "e.g. one moved aside as CACHE_DIR.stale-TIME")
    url = args.store
    if url is None:
        url = layout.read_status().get("store")
    store = None
    block_size = DEFAULT_BLOCK_SIZE
    if url:
        args.store = url
        store = _open(args)
        block_size = read_superblock(store).block_size
    else:
        print("wsfs: no store known for this cache dir (pass --store): only blocks it still "
              "holds can be recovered", file=sys.stderr)
    count = export(cache_dir, store, block_size, args.into)
    print(f"recovered {count} files the store never got from {cache_dir} into {args.into}")
    return 0
