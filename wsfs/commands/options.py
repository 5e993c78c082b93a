"""The options of `wsfs mount`, each given three ways: a flag, `-o name=value` and `WSFS_NAME`.

OPTIONS is the one place an option is listed. The argparse flags, the `-o` keys, the
environment variables, the help's list of variables and the user guide's table all derive
from it, so the three forms cannot drift apart. `resolve` applies the precedence once, for
every command: a flag beats `-o`, which beats the environment, which beats the default. That
is why every flag's argparse default is None: "not given" must be told from "given as the
default".

`-o` also carries what is not an option of wsfs but of the kernel or of mount(8): GENERIC says,
for each such option mount(8) may pass, whether it goes to the kernel, is already how wsfs
behaves, is mount(8)'s or systemd's own business, or is refused (with the reason). Every
option is judged by `split_o`, in the `wsfs mount` process, before anything is taken (the
cache dir, the lease): libfuse must never be handed an option it would refuse.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..config import MountConfig
from ..errors import UsageError

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SWITCH_VALUES = {"1": True, "yes": True, "true": True, "on": True,
                 "0": False, "no": False, "false": False, "off": False}


# -- value parsers: (text, what) -> value; `what` names the form the text came in -------------

def parse_text(text: str, what: str) -> str:
    return text


def parse_size(text: str, what: str) -> int:
    """Parse '10G', '512M', '1.5T', '4096' (binary units) into bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{what} {text!r} is not a size; write it like 512M, 10G or 1T")
    value = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be more than zero")
    return value


def parse_seconds(text: str, what: str) -> float:
    try:
        return config.parse_seconds(text)
    except ValueError as e:
        raise UsageError(f"{what} {e}, not {text!r}") from None


def parse_timeout(text: str, what: str) -> float:
    """Seconds that must be more than zero (a zero read timeout would fail every read)."""
    value = parse_seconds(text, what)
    if value <= 0:
        raise UsageError(f"{what} must be more than zero seconds, not {text!r}")
    return value


def parse_dir(text: str, what: str) -> Path:
    """A directory: an empty one is refused, since Path("") is the working directory, which
    nobody means."""
    if not text:
        raise UsageError(f"{what} needs a directory, not an empty value")
    return Path(text)


def parse_when(text: str, what: str) -> str:
    """A past state, as `--at` names it (meta/retention.py resolves it against the store)."""
    if not text.strip():
        raise UsageError(f"{what} needs a checkpoint number, a snapshot name, a time or an "
                         "age, not an empty value")
    return text.strip()


def parse_label(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"the label {text!r} ({what}) must be written KEY=VALUE")
    return key, value


def parse_owner(text: str, what: str) -> tuple[int, int]:
    """UID:GID in numbers: names would be looked up on this machine, not where it is used."""
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m:
        raise UsageError(f"{what} must be UID:GID in numbers, not {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_fsync(text: str, what: str) -> bool:
    """True for `remote` (fsync waits for the upload), False for `local`."""
    if text not in ("local", "remote"):
        raise UsageError(f"{what} must be local or remote, not {text!r}")
    return text == "remote"


def parse_keep(text: str, what: str) -> str:
    """A retention schedule (wsfs/meta/retention.py), checked and written the canonical way."""
    from ..meta.retention import BadSchedule, Schedule

    try:
        return str(Schedule.parse(text))
    except BadSchedule as e:
        raise UsageError(f"{what}: {e}") from None


def parse_switch(text: str, what: str) -> bool:
    try:
        return SWITCH_VALUES[text.strip().lower()]
    except KeyError:
        raise UsageError(f"{what} must be 1 or 0 (yes or no), not {text!r}") from None


# -- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One option of `wsfs mount`: `--name-with-dashes`, `-o name=`, `WSFS_NAME`."""

    name: str  # the -o key and the MountConfig field, unless o_key or field_name say
    help: str
    metavar: str | None  # None: a switch, on or off (parse_switch)
    parse: Callable[[str, str], Any] = parse_text
    default: str | None = None  # as the user would write it; None: unset (or off)
    default_doc: str | None = None  # the default in words, when not a value
    repeat: bool = False  # given many times: a list (the environment: comma-separated)
    collect: Callable[[list[Any]], Any] = list  # a repeated option's values -> the field
    env_name: str | None = None
    field_name: str | None = None  # the MountConfig field, when not `name`
    o_key: str | None = None  # when not `name` (ro for read_only)
    o_off: str | None = None  # -o key that turns a switch off (rw)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def field(self) -> str:
        return self.field_name or self.name

    @property
    def key(self) -> str:
        return self.o_key or self.name

    @property
    def env(self) -> str:
        return self.env_name or "WSFS_" + self.name.upper()

    @property
    def switch(self) -> bool:
        return self.metavar is None

    def o_form(self) -> str:
        """How `-o` takes it: `cache_size=SIZE`, `init`."""
        return self.key if self.switch else f"{self.key}={self.metavar}"

    def env_form(self) -> str:
        if self.switch:
            return f"{self.env}=1"
        return f"{self.env}={self.metavar}" + (",..." if self.repeat else "")

    def note(self) -> str:
        if self.o_off:
            return f" ({self.o_off}: off)"
        return " (repeatable)" if self.repeat else ""

    def default_text(self) -> str | None:
        """The default in words; None when an unset option is simply absent."""
        if self.default_doc is not None:
            return self.default_doc
        if self.default is not None:
            return self.default
        return "off" if self.switch else None


OPTIONS = (
    Option("endpoint_url", "S3-compatible endpoint", "URL",
           default_doc="$AWS_ENDPOINT_URL, else AWS"),
    Option("region", "S3 region", "REGION", default_doc="from the AWS config"),
    Option("profile", "AWS profile whose keys to use (sets AWS_PROFILE)", "NAME",
           default_doc="$AWS_PROFILE, else default"),
    Option("credentials_file", "AWS shared-credentials file with the store's keys; "
           "refused unless mode 0600", "FILE", parse=parse_dir,
           default_doc="$AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials"),
    Option("cache_dir", "local cache directory: the data not uploaded yet, the blocks read, "
           "the metadata and wsfs.log", "DIR", parse=parse_dir,
           default_doc="/var/cache/wsfs/<hash of STORE>; a non-root user: ~/.cache/wsfs/<hash>"),
    Option("cache_size", "limit of the clean (uploaded) block cache", "SIZE",
           parse=parse_size, default="10G"),
    Option("dirty_limit", "bytes not yet uploaded at which writers wait for uploads", "SIZE",
           parse=parse_size, default="2G"),
    Option("flush_delay", "seconds a change may wait before it is uploaded", "SECONDS",
           parse=parse_seconds, default="5"),
    Option("fsync", "when fsync(2) returns: once the data is on the local disk, or once it "
           "is uploaded", "local|remote", parse=parse_fsync, default="local",
           field_name="fsync_remote"),
    Option("unmount_timeout", "seconds the final flush retries an unreachable store",
           "SECONDS", parse=parse_seconds, default="600"),
    Option("handover_timeout", "seconds a mount waits for the previous daemon of its cache "
           "dir to finish the upload it began at its unmount", "SECONDS", parse=parse_seconds,
           default="600"),
    Option("read_timeout", "seconds a read of uncached data waits for an unreachable store "
           "before it fails with EIO", "SECONDS", parse=parse_timeout, default="60"),
    Option("enospc_timeout", "seconds a writer waits on a full cache disk, with no space "
           "freed, before it gets ENOSPC", "SECONDS", parse=parse_seconds, default="60"),
    Option("keep", "which checkpoints stay in the store, to go back to: every one younger "
           "than AGE, or AGE:EVERY the newest of each EVERY-long period younger than AGE, "
           "terms joined by + (units s m h d w; 0: only the newest); named snapshots stay "
           "too", "SCHEDULE", parse=parse_keep, default="15m+48h:1h+30d:1d"),
    Option("read_only", "mount read-only, without the lease, anywhere (beside the writer "
           "too): the newest checkpoint, followed as the writer publishes (or --at's)", None,
           o_key="ro", o_off="rw"),
    Option("at", "mount read-only the past state WHEN names: a checkpoint number (#12), a "
           "snapshot name, a time (2024-05-01T14:30) or an age (90m, 2d ago), which picks the "
           "newest checkpoint at or before it", "WHEN", parse=parse_when,
           default_doc="the newest, followed"),
    Option("refresh", "seconds between a read-only mount's looks for a newer checkpoint "
           "(0: it stays on the one it mounted)", "SECONDS", parse=parse_seconds,
           default="5"),
    Option("nonempty", "mount over a non-empty MOUNTPOINT, hiding its files", None),
    Option("metrics", "serve Prometheus metrics on http://ADDR:PORT/metrics", "ADDR:PORT",
           default_doc="off"),
    Option("force", "take the workspace over even if another mount holds its lease", None),
    Option("init", "create the workspace if STORE holds none", None),
    Option("framework", "the framework recorded in the marker of a workspace created here",
           "NAME"),
    Option("label", "a label recorded in the marker of a workspace created here", "KEY=VALUE",
           parse=parse_label, repeat=True, collect=dict, env_name="WSFS_LABELS",
           field_name="labels"),
    Option("owner", "owner of the root directory of a workspace created here", "UID:GID",
           parse=parse_owner, default_doc="the caller"),
)
BY_NAME = {o.name: o for o in OPTIONS}
# The options of `wsfs mount` (and `wsfs run`), in the order of its --help; each is a
# MountConfig field.
MOUNT = tuple(o.name for o in OPTIONS)
STORE = ("endpoint_url", "region")  # every command that opens a store


# -- mount(8)'s generic options ----------------------------------------------------------------

# What wsfs does with an option that is not its own (the table's second column).
KERNEL = "kernel"  # passed to the kernel through libfuse
KEPT = "accepted"  # already how wsfs behaves: nothing to pass
MOUNT8 = "mount(8)"  # acted on by mount(8) or systemd, ignored by wsfs
REFUSED = "refused"  # the mount fails at once with the reason


@dataclass(frozen=True)
class Generic:
    """Options of mount(8), FUSE or systemd that `-o` may carry, and what wsfs does with them.

    `names` ending in `=` take a value, in `*` any suffix (`x-*`)."""

    names: tuple[str, ...]
    action: str
    meaning: str  # what it does under wsfs; for REFUSED, the reason (one sentence's end)


# Every libfuse 3 (3.14 on Debian 12, 3.17 on 13) takes the KERNEL ones: relatime or lazytime
# are unknown to 3.14, which is why they are KEPT, not passed on.
GENERIC = (
    Generic(("nosuid", "nodev"), KERNEL,
            "the default: set-user-ID bits and device files in the workspace have no effect"),
    Generic(("suid", "dev"), KERNEL,
            "set-user-ID bits and device files work (root mounts only); asked through mount(8), "
            "they are honoured on Debian 12 too, whose libmount hides them from the helper"),
    Generic(("noexec", "exec"), KERNEL, "programs in the workspace cannot (can) be run"),
    Generic(("noatime", "atime"), KERNEL,
            "shown in /proc/self/mountinfo; wsfs never updates atime on read either way"),
    Generic(("sync",), KERNEL,
            "each write(2) returns only once fsync(2) would (see `fsync`); directory changes "
            "are not written through"),
    Generic(("allow_other", "allow_root", "auto_unmount"), KERNEL, "FUSE's own"),
    Generic(("relatime", "norelatime", "nostrictatime", "nodiratime", "diratime", "lazytime",
             "nolazytime", "async", "defaults", "default_permissions", "silent", "loud",
             "fsname=", "subtype="), KEPT,
            "the kernel's defaults, or how wsfs works anyway: atime is never updated on read, "
            "timestamps are kept in wsfs's metadata, permissions are checked by the kernel, "
            "the mount is named fuse.wsfs after its store"),
    Generic(("remount",), MOUNT8,
            "`mount -o remount,ro MOUNTPOINT` (or `rw`, `noexec`, ...): the helper changes the "
            "running mount's kernel flags; read-only, writes get EROFS and what is dirty is "
            "still uploaded; flags not named keep their state, wsfs's own options their values"),
    Generic(("auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner",
             "group", "user=", "comment=", "x-*", "X-*"), MOUNT8,
            "acted on by mount(8) or systemd (x-systemd.automount, ...), ignored by wsfs"),
    Generic(("strictatime",), REFUSED, "wsfs never updates atime on read"),
    Generic(("dirsync",), REFUSED,
            "wsfs does not write each directory change through; fsync(2) the directory"),
    Generic(("mand",), REFUSED, "Linux no longer has mandatory locks"),
    Generic(("iversion",), REFUSED, "wsfs keeps no i_version change counter"),
    Generic(("nosymfollow",), REFUSED, "libfuse 3.14 (Debian 12) cannot set it"),
    Generic(("context=", "fscontext=", "defcontext=", "rootcontext="), REFUSED,
            "wsfs has no SELinux labels (security.selinux answers ENOTSUP)"),
)
# For the kernel flags: the one each cancels (the last given wins, as for mount(8)).
OPPOSITE = {"suid": "nosuid", "dev": "nodev", "exec": "noexec", "atime": "noatime",
            "sync": "async"}
OPPOSITE.update({v: k for k, v in OPPOSITE.items()})


def generic(opt: str) -> Generic | None:
    """The entry of GENERIC that `opt` (as written in -o: `x-systemd.automount`, `user=ada`)
    falls under, or None."""
    key, sep, _ = opt.partition("=")
    for g in GENERIC:
        for name in g.names:
            if ((name.endswith("*") and opt.startswith(name[:-1]))
                    or (name.endswith("=") and sep and name == key + "=")
                    or name == opt):
                return g
    return None


def generic_markdown_table() -> str:
    """The user guide's table of mount(8)'s generic options (a test keeps the two equal)."""
    rows = ["| Option | wsfs | what it does under wsfs (refused: why) |",
            "|--------|------|---------------------------------------|"]
    for g in GENERIC:
        names = ", ".join(f"`{n}VALUE`" if n.endswith("=") else f"`{n}`" for n in g.names)
        rows.append(f"| {names} | {g.action} | {g.meaning} |")
    return "\n".join(rows)

def add_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add the flags of the options `names`, with None defaults (see the module docstring)."""
    for name in names:
        o = BY_NAME[name]
        default = o.default_text()
        help_text = o.help + (f" (default: {default})" if default else "")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help
        if o.switch:
            parser.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(o.flag, metavar=o.metavar, default=None, help=help_text,
                                action="append" if o.repeat else "store")


STORE_HELP = ("where the workspace lives: s3://BUCKET[/PREFIX], or file:///ABS/DIR for a "
              "store in a local directory")


def add_store(parser: argparse.ArgumentParser, names: Iterable[str] = STORE) -> None:
    """The STORE argument of a verb that opens a store, and the flags of `names`."""
    parser.add_argument("store", metavar="STORE", help=STORE_HELP)
    add_flags(parser, names)


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """Every mount option, as `-o` and as flags: `wsfs mount` and `wsfs run` take them alike."""
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="comma-separated mount options: the wsfs options below as "
                        "NAME=VALUE (cache_size=5G), FUSE options (allow_other, noatime, ...); "
                        "mount(8)'s own (_netdev, noauto, x-systemd.*, ...) are ignored")
    add_flags(parser, MOUNT)


def split_o(groups: Iterable[str], names: Iterable[str]
            ) -> tuple[dict[str, list[str]], set[str]]:
    """`-o a,b=c` groups: the values of the options `names` (a switch alone is "1", its off
    key "0"), and the flags for the kernel (of two opposites, the last given). Anything
    unknown or refused (GENERIC) is a UsageError, before anything is taken."""
    by_key = {BY_NAME[n].key: BY_NAME[n] for n in names}
    off = {BY_NAME[n].o_off: BY_NAME[n] for n in names if BY_NAME[n].o_off}
    values: dict[str, list[str]] = {}
    fuse: set[str] = set()
    for group in groups:
        for opt in filter(None, (o.strip() for o in group.split(","))):
            key, sep, value = opt.partition("=")
            option = by_key.get(key)
            if option is not None and (sep or option.switch):
                values.setdefault(option.name, []).append(value if sep else "1")
                continue
            if key in off and not sep:
                values.setdefault(off[key].name, []).append("0")
                continue
            g = generic(opt)
            if g is None and option is not None:
                raise UsageError(f"the mount option {key!r} needs a value: -o {key}="
                                 f"{option.metavar}")
            if g is None:
                raise UsageError(f"unknown mount option {opt!r}; see `wsfs mount --help`")
            if g.action == REFUSED:
                raise UsageError(f"the mount option {opt!r} is refused: {g.meaning}")
            if opt == "remount":
                raise UsageError("wsfs mount only mounts; change a mounted workspace with "
                                 "`mount -o remount,ro MOUNTPOINT` (or remount,rw)")
            if g.action == KERNEL:
                fuse.discard(OPPOSITE.get(opt, ""))
                fuse.add(opt)
    return values, fuse


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Replace each option's flag value on `args` by its final value: the flag, else the last
    `-o`, else the environment (an empty variable counts as unset), else the default. What the
    command line gives is checked even where a flag overrides it; the environment only when
    used. With `-o` on `args` (`args.options`), its FUSE flags land in `args.fuse_options`."""
    names = [o.name for o in OPTIONS if hasattr(args, o.name)]
    given, fuse = split_o(getattr(args, "options", None) or [], names)
    if hasattr(args, "options"):
        args.fuse_options = fuse
    for name in names:
        o = BY_NAME[name]
        flag, env = getattr(args, name), environ.get(o.env, "")
        from_o = _value(o, given[name], f"-o {o.key}") if name in given else None
        value: Any
        if isinstance(flag, bool):  # a switch (BooleanOptionalAction)
            value = flag
        elif flag is not None:
            value = _value(o, flag if isinstance(flag, list) else [flag], o.flag)
        elif name in given:
            value = from_o
        elif env:
            value = _value(o, env.split(",") if o.repeat else [env], o.env)
        elif o.default is not None:
            value = _value(o, [o.default], "the default")
        else:
            value = o.collect([]) if o.repeat else (False if o.switch else None)
        setattr(args, name, value)


def mount_config(args: argparse.Namespace) -> MountConfig:
    """The mount configuration from `wsfs mount` (or `wsfs run`) arguments, once `resolve` has
    given each option its final value."""
    fields: dict[str, Any] = {BY_NAME[n].field: getattr(args, n) for n in MOUNT}
    return MountConfig(store_url=args.store, mountpoint=args.mountpoint,
                       foreground=args.foreground, fuse_options=args.fuse_options, **fields)


def _value(o: Option, texts: list[str], what: str) -> Any:
    """The value of `texts` given in one form: each is checked; a repeated option's are
    collected, otherwise the last wins (as for mount(8))."""
    parse = parse_switch if o.switch else o.parse
    values = [parse(text, what) for text in texts]
    return o.collect(values) if o.repeat else values[-1]


def environment_help(names: Iterable[str]) -> str:
    """The help's epilog part: each option's environment variable and -o form."""
    lines = ["Every option is also an -o option (as fstab writes it) and an environment",
             "variable; a flag beats -o, which beats the environment, which beats the default:"]
    for name in names:
        o = BY_NAME[name]
        lines.append(f"  {o.env_form():<30} -o {o.o_form()}{o.note()}")
    return "\n".join(lines)


def variables_help(names: Iterable[str]) -> str:
    """The epilog of a command without -o: its options' environment variables."""
    lines = ["environment variables (a flag beats its variable):"]
    lines += [f"  {BY_NAME[n].env_form():<30} {BY_NAME[n].flag}" for n in names]
    return "\n".join(lines)


def markdown_table(names: Iterable[str] = MOUNT) -> str:
    """The user guide's table of options (docs/user-guide.md; a test keeps the two equal)."""
    rows = ["| Flag | `-o` (fstab) | Environment | Default | Meaning |",
            "|------|--------------|-------------|---------|---------|"]
    for name in names:
        o = BY_NAME[name]
        flag = o.flag if o.switch else f"{o.flag} {o.metavar}"
        cells = [f"`{flag}`", f"`{o.o_form()}`{o.note()}", f"`{o.env_form()}`",
                 (o.default_text() or "-").replace("<", "\\<"), o.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - `python -m wsfs.commands.options` prints the tables
    print(markdown_table())
    print()
    print(generic_markdown_table())
