"""User-facing failures: one exception type carrying an exit code.

Every error a user can cause or fix (bad input, an unreachable store, a refused mount) is raised
as a `WsfsError` subclass with a one-sentence message that says what to do;
`wsfs.commands.cli` prints the message and exits with `exit_code`. The exit codes are part of
the interface (docs/exit-codes.md).
"""

from __future__ import annotations


class WsfsError(Exception):
    """A failure the user can act on; the message is one sentence with the fix."""

    exit_code = 1


class UsageError(WsfsError):
    """Malformed arguments, options, sizes or URLs."""

    exit_code = 2


class StoreError(WsfsError):
    """The object store cannot be reached, authenticated against, or used."""

    exit_code = 3


class NoWorkspaceError(WsfsError):
    """The store holds no workspace, or its marker file is missing or unreadable."""

    exit_code = 4


class LeaseError(WsfsError):
    """Another writer holds the workspace."""

    exit_code = 5


class MountError(WsfsError):
    """The mountpoint or cache directory cannot be used, or the kernel refused the mount."""

    exit_code = 6


class FlushError(WsfsError):
    """Dirty data could not be uploaded before the deadline; it stays in the cache dir."""

    exit_code = 7

    @classmethod
    def stopped_early(cls, status: dict[str, object], cache_dir: object) -> FlushError:
        """For a daemon that exited without reporting every byte uploaded (`status` is the
        last status.json it wrote)."""
        why = status.get("last_error") or f"its last state was {status.get('state', 'unknown')}"
        return cls(f"the wsfs daemon stopped before everything was uploaded ({why}); the "
                   f"dirty data stays in {cache_dir} and the next mount with that cache dir "
                   "uploads it")


class FormatError(WsfsError):
    """The store was written by an incompatible (newer) wsfs format."""

    exit_code = 8


class DamageError(WsfsError):
    """`wsfs fsck` found damage: blocks missing or corrupt, or inconsistent metadata."""

    exit_code = 9


class DaemonGoneError(WsfsError):
    """The daemon of a mount was killed or crashed: the mount is dead until it is unmounted
    and mounted again (what the daemon had received stays in its cache dir)."""

    exit_code = 10

    @classmethod
    def of(cls, mountpoint: object, pid: object, cache_dir: object) -> DaemonGoneError:
        return cls(f"the daemon of {mountpoint} (pid {pid}) is gone: the mount is dead; "
                   f"recover with `wsfs unmount {mountpoint}` (or `fusermount3 -uz "
                   f"{mountpoint}`) and mount it again: the unsaved data stays in {cache_dir} "
                   "and the next mount with that cache dir uploads it")


class CommandNotExecutable(WsfsError):
    """`wsfs run`: the command was found but cannot be executed (as a shell exits)."""

    exit_code = 126


class CommandNotFound(WsfsError):
    """`wsfs run`: the command was not found (as a shell exits)."""

    exit_code = 127
