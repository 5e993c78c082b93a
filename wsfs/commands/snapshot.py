"""`wsfs snapshot create|delete|list MOUNTPOINT|STORE`: name a checkpoint so that it stays,
and see every state the store keeps.

A name pins one checkpoint until it is deleted, whatever the schedule (`--keep`) says; it
is an object of its own in the store (meta/history.py), so naming works on a workspace
mounted here, mounted elsewhere, or not mounted at all, and needs no lease. Given a
MOUNTPOINT, `create` first publishes what was written to it so far (as `wsfs sync` does), so
the snapshot holds it; given a STORE, it pins the newest published checkpoint.

Bad input (a name that is taken or unknown, a time before the first kept checkpoint or in
the future) is one sentence and exit 2, with nothing changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import MountError, UsageError, WsfsError
from ..meta import checkpoint as ckpt
from ..meta import retention
from ..meta.history import History, Snapshot, create_snapshot, delete_snapshot, read_snapshots
from ..progress import human_bytes, human_seconds
from ..store import NoSuchKey, ObjectStore
from . import options

WHERE_HELP = ("a wsfs mount of this machine, or the workspace's store: s3://BUCKET[/PREFIX] or "
              "file:///ABS/DIR")
WHEN_HELP = ("the checkpoint to pin instead of the newest: its number (#12), a time "
             "(2024-05-01T14:30, local unless it says its zone; 2h ago) picks the newest "
             "checkpoint at or before it, or another snapshot's name")


def arguments(sp: argparse.ArgumentParser) -> None:
    """`wsfs snapshot`'s actions and their arguments (registered in cli.py's VERBS)."""
    fmt = sp.formatter_class
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="create, delete or list (`wsfs snapshot ACTION --help`)")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("where", metavar="MOUNTPOINT|STORE", help=WHERE_HELP)
        options.add_flags(parser, options.STORE)
        parser.epilog = options.variables_help(options.STORE)

    p = actions.add_parser("create", formatter_class=fmt,
                           help="pin the newest checkpoint (or --at WHEN) under NAME until "
                           "it is deleted")
    common(p)
    p.add_argument("name", metavar="NAME",
                   help="a letter, then up to 63 letters, digits, '.', '_' or '-'")
    p.add_argument("--at", metavar="WHEN", default=None, help=WHEN_HELP)
    p = actions.add_parser("delete", formatter_class=fmt,
                           help="take the name NAME away (the schedule then decides whether "
                           "its checkpoint stays)")
    common(p)
    p.add_argument("name", metavar="NAME", help="the snapshot's name")
    p = actions.add_parser("list", formatter_class=fmt,
                           help="every kept checkpoint: its time, names, files and the space "
                           "only it holds")
    common(p)
    p.add_argument("--quick", action="store_true",
                   help="numbers, times and names only: read no checkpoint's metadata")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for choice in actions._choices_actions:  # each action's --help opens with what it does
        if choice.help:
            actions.choices[choice.dest].description = (choice.help[0].upper()
                                                         + choice.help[1:] + ".")


def run(args: argparse.Namespace) -> int:
    store, mountpoint = _target(args)
    if args.action == "create":
        return _create(store, mountpoint, args.name, args.at)
    if args.action == "delete":
        return _delete(store, args.name)
    return _list(store, quick=args.quick, as_json=args.json)


def _target(args: argparse.Namespace) -> tuple[ObjectStore, Path | None]:
    """The store of `args.where`, and the mountpoint if it named one."""
    from ..store import open_store, probe

    mountpoint = None
    url = args.where
    if "://" not in url:
        from ..daemon.status import registry_entry

        mountpoint = Path(url)
        url = registry_entry(mountpoint).store
        if not url:
            raise MountError(f"{mountpoint} is a wsfs mount whose store is not recorded; give "
                             "the store instead")
    store = open_store(url, endpoint_url=args.endpoint_url, region=args.region)
    probe(store)
    return store, mountpoint


def _create(store: ObjectStore, mountpoint: Path | None, name: str, at: str | None) -> int:
    try:
        retention.check_name(name)
    except retention.BadWhen as e:
        raise UsageError(str(e)) from None
    history = History()
    history.refresh(store)
    names = read_snapshots(store)
    if name in names:
        raise UsageError(f"a snapshot named {name!r} exists already (checkpoint "
                         f"{names[name].seq}); pick another name, or delete that one first")
    if at is None:
        if mountpoint is not None:
            from ..daemon.status import sync

            sync(mountpoint, progress=sys.stderr.isatty())
        seq = ckpt.read_head(store)
        if seq is None:
            raise UsageError(f"{store.url} has no checkpoint yet")
    else:
        try:
            seq = retention.resolve(at, history.times(), {n: s.seq for n, s in names.items()},
                                    time.time())
        except retention.BadWhen as e:
            raise UsageError(str(e)) from None
    try:
        manifest = history.manifests.get(seq) or ckpt.read_manifest(store, seq)
        snap = create_snapshot(store, name, seq)
    except NoSuchKey:
        raise WsfsError(f"checkpoint {seq} was thinned while it was being named; name "
                        "another one (`wsfs snapshot list` shows the kept ones)") from None
    if snap is None:
        raise UsageError(f"a snapshot named {name!r} was created meanwhile; pick another name")
    created = manifest.created_ns / 1e9
    print(f"snapshot {name}: checkpoint #{seq} of {retention.when_text(created)} "
          f"({human_seconds(time.time() - created)} ago), kept until deleted")
    return 0


def _delete(store: ObjectStore, name: str) -> int:
    if not delete_snapshot(store, name):
        names = sorted(read_snapshots(store))
        raise UsageError(f"there is no snapshot named {name!r}"
                         + (f" (there are: {', '.join(names)})" if names else ""))
    print(f"deleted the snapshot {name}; its checkpoint stays only as long as the schedule "
          "keeps it")
    return 0


def _list(store: ObjectStore, *, quick: bool, as_json: bool) -> int:
    from .admin.holdings import Held, holdings

    history = History()
    history.refresh(store)
    names = read_snapshots(store)
    if quick:
        rows = [Held(m.seq, m.created_ns / 1e9) for m in history.manifests.values()]
        for snap in names.values():
            for row in rows:
                if row.seq == snap.seq:
                    row.names.append(snap.name)
        seconds = None
    else:
        measured = holdings(store, history, names.values())
        rows, seconds = measured.checkpoints, measured.seconds
    missing = [s for s in names.values() if s.seq not in history.manifests]
    if as_json:
        print(json.dumps({
            "store": store.url,
            "checkpoints": [{"seq": r.seq, "created": r.created, "names": sorted(r.names),
                             **({} if quick else {"files": r.files, "bytes": r.bytes,
                                                  "only_bytes": r.only_bytes,
                                                  "missing_objects": r.missing})}
                            for r in sorted(rows, key=lambda r: r.seq)],
            "missing": {s.name: s.seq for s in missing}}, indent=1))
    else:
        print(_table(rows, missing, quick, seconds))
    return 0


def _table(rows: list[Any], missing: list[Snapshot], quick: bool, seconds: float | None) -> str:
    now = time.time()
    out = [f"{'CHECKPOINT':>10}  {'CREATED':<25} {'AGE':>8}"
           + ("" if quick else f" {'FILES':>8} {'ONLY IT HOLDS':>13}") + "  NAME"]
    newest = max((r.seq for r in rows), default=None)
    for r in sorted(rows, key=lambda r: r.seq):
        line = (f"{'#' + str(r.seq):>10}  {retention.when_text(r.created):<25} "
                f"{human_seconds(max(0.0, now - r.created)):>8}")
        if not quick:
            line += f" {r.files:>8} {human_bytes(r.only_bytes):>13}"
        label = ", ".join(sorted(r.names)) + (" (newest)" if r.seq == newest else "")
        if not quick and r.missing:
            label += f" DAMAGED: {r.missing} objects missing (wsfs fsck --at {r.seq})"
        out.append(f"{line}  {label.strip()}")
    for snap in sorted(missing, key=lambda s: s.name):
        out.append(f"{'#' + str(snap.seq):>10}  {'MISSING':<25} {'':>8}"
                   + ("" if quick else f" {'':>8} {'':>13}") + f"  {snap.name}: its checkpoint "
                   "is gone from the store")
    if not quick:
        out.append(f"ONLY IT HOLDS: what deleting that checkpoint alone would free (data "
                   f"objects and metadata pages no other kept one names); measured in "
                   f"{seconds or 0:.1f}s")
    return "\n".join(out)
