"""What mount(8) was asked, where its helper cannot see it.

libmount before 2.39 (Debian 12 has 2.38) turns the options into mount flags and back into text
before it runs a helper, and an option that only clears a flag comes back as nothing: `-o dev`
reaches mount.fuse.wsfs as `-o rw`, exactly like no option at all (2.41, on Debian 13, passes
`rw,dev`). A helper that wants to keep a safe default (nodev, nosuid) and still honour an
fstab line that asks for `dev` must read the request where it still is: the helper's parent is
that mount(8) (systemd runs mount(8) too, with the options after -o), so its command line
holds the -o options, and the fstab line it read, if it read one, is still in the fstab.

Only ever used to *find* an option the helper was not shown; what the helper's own arguments
say always wins (`nodev` there is libmount's final word).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..runtime import mount_field

# mount(8)'s options that take a value (util-linux 2.38 to 2.41), short and long.
SHORT_WITH_VALUE = set("oOtTLUN")
LONG_WITH_VALUE = {"--options", "--test-opts", "--types", "--fstab", "--label", "--uuid",
                   "--namespace", "--source", "--target", "--options-mode", "--options-source",
                   "--map-users", "--map-groups"}
FSTAB = Path("/etc/fstab")


def parse_mount_command(argv: list[str]) -> tuple[list[str], Path | None, list[str]]:
    """mount(8)'s arguments (without argv[0]): its -o options in order, the fstab it was
    given (-T), and its positional arguments (--source/--target count as such)."""
    opts: list[str] = []
    fstab: Path | None = None
    positional: list[str] = []

    def take(name: str, value: str) -> None:
        nonlocal fstab
        if name in ("o", "--options"):
            opts.extend(filter(None, value.split(",")))
        elif name in ("T", "--fstab"):
            fstab = Path(value)
        elif name in ("--source", "--target"):
            positional.append(value)

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            if name in LONG_WITH_VALUE:
                if not sep and i < len(argv):
                    value, i = argv[i], i + 1
                take(name, value)
            continue
        if arg.startswith("-") and len(arg) > 1:
            for j, flag in enumerate(arg[1:], 1):
                if flag in SHORT_WITH_VALUE:
                    value = arg[j + 1:]
                    if not value and i < len(argv):
                        value, i = argv[i], i + 1
                    take(flag, value)
                    break
            continue
        positional.append(arg)
    return opts, fstab, positional


def fstab_options(fstab: Path, target: str) -> list[str]:
    """The options of the first line of `fstab` that mounts on `target`, as mount(8) finds
    it; [] without one."""
    try:
        lines = fstab.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[0].startswith("#"):
            continue
        if os.path.normpath(mount_field(fields[1])) == target:
            return [o for o in fields[3].split(",") if o]
    return []


def parent_request(target: str, ppid: int | None = None) -> list[str]:
    """The options mount(8) was asked for a mount on `target`, in the order libmount applies
    them (the fstab line's, then the command line's); [] if the parent is not mount(8)."""
    ppid = os.getppid() if ppid is None else ppid
    try:
        exe = os.readlink(f"/proc/{ppid}/exe")
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return []
    if Path(exe).name != "mount":
        return []
    opts, fstab, positional = parse_mount_command(argv.split("\0")[1:-1])
    if len(positional) >= 2:  # SOURCE and TARGET given: mount(8) reads no fstab
        return opts
    fstab = fstab or Path(os.environ.get("LIBMOUNT_FSTAB") or FSTAB)
    return [*fstab_options(fstab, os.path.normpath(target)), *opts]


def last_of(options: Iterable[str], *names: str) -> str | None:
    """Which of `names` comes last in `options` (mount(8)'s rule), None if none does."""
    found = None
    for opt in options:
        if opt in names:
            found = opt
    return found
