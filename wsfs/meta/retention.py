"""Retention: which checkpoints a workspace keeps, and which objects may leave the store.

Pure functions, no I/O and no clock of their own (`now` is given): the running daemon
(sync/retain.py), `wsfs gc` and `wsfs snapshot` all decide with these, so a kept checkpoint
means the same thing everywhere.

**The schedule** (`--keep`, `-o keep=`, `WSFS_KEEP`) is a list of terms joined by `+`:
`AGE` keeps every checkpoint younger than AGE; `AGE:EVERY` keeps, of the checkpoints younger
than AGE, the newest of each EVERY-long period of the local clock (hours start on the hour,
days at local midnight). Durations are a number and a unit: `s`, `m`, `h`, `d`, `w`; AGE may
be `forever`. The default, `15m+48h:1h+30d:1d`, keeps every checkpoint of the last 15
minutes, one per hour for 48 hours and one per day for 30 days. `0` keeps only the newest.
Commas work too where nothing splits them (a flag, the variable), but `-o` splits its options
at commas, as fstab does, so `+` is the form that works everywhere. The newest checkpoint and
every checkpoint a named snapshot pins are always kept.

Thinning is monotonic: a checkpoint the schedule lets go is never wanted again later. Its
terms only ever stop covering a checkpoint as it ages, and the newest checkpoint of a closed
period stays the newest of it, so a thinning pass, however often it runs, ends with exactly
the checkpoints a single pass over the whole history would keep (tests/test_retention.py
checks this over a simulated month).

**The deletion rule** (`may_delete`) is the one answer to "may this data object (a block of
its own, or a pack) be deleted from the store?": only if no kept checkpoint names it. The
checkpoints that name an object are a contiguous run of numbers: block ids are never reused
and a pack never gains members (repacking writes new packs), so once an object leaves the
tree it never comes back. The run starts at the first checkpoint published after the object
was uploaded (`born`: the number after the newest published one at its upload, a lower bound)
and ends at the last one published before it was dropped (`died`). The daemon knows both for
each object it drops (the `garbage` table, meta/schema.py); `wsfs gc`, which reads the kept
checkpoints themselves, knows exactly which of them name each object. Either way the object
stays while any kept checkpoint falls in its run.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

DEFAULT_KEEP = "15m+48h:1h+30d:1d"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FOREVER = math.inf
# A snapshot's name: a letter first, so that a name never reads as a checkpoint number or a
# time (`--at` takes all three); it is part of an object key, hence the short alphabet.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


class BadSchedule(ValueError):
    """A `--keep` value that does not parse; its message is one sentence for the user."""


class BadWhen(ValueError):
    """A `--at` value that names no kept checkpoint; its message is one sentence."""


def parse_duration(text: str) -> float:
    """'15m' -> 900.0; 'forever' -> inf; '0' -> 0. Raises BadSchedule."""
    text = text.strip().lower()
    if text == "forever":
        return FOREVER
    if text == "0":
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if not m:
        raise BadSchedule(f"{text!r} is not a duration; write it like 90s, 15m, 48h, 30d or 2w")
    return float(m.group(1)) * UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds == FOREVER:
        return "forever"
    if seconds == 0:
        return "0"
    for unit in ("w", "d", "h", "m"):
        if seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Rule:
    """Keep, of the checkpoints younger than `within` seconds, every one (`every` None) or
    the newest of each `every`-second period of the local clock."""

    within: float
    every: float | None = None
    text: str = field(default="", compare=False)  # as written (48h, not 2d)

    def __str__(self) -> str:
        if self.text:
            return self.text
        age = format_duration(self.within)
        return age if self.every is None else f"{age}:{format_duration(self.every)}"


@dataclass(frozen=True, slots=True)
class Schedule:
    rules: tuple[Rule, ...]

    def __str__(self) -> str:
        return "+".join(str(r) for r in self.rules) or "0"

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Parse a `--keep` value (see the module docstring); raises BadSchedule."""
        terms = [t.strip() for t in re.split(r"[+,]", text)]
        if not text.strip() or not all(terms):
            raise BadSchedule(f"the schedule {text!r} has an empty term; write it like "
                              f"{DEFAULT_KEEP}")
        rules = []
        for term in terms:
            age, sep, every = term.partition(":")
            within = parse_duration(age)
            period = parse_duration(every) if sep else None
            if period is not None and not 0 < period < FOREVER:
                raise BadSchedule(f"the period in {term!r} must be a duration above zero, "
                                  "like 1h or 1d")
            if within > 0:
                rules.append(Rule(within, period, term.lower()))
        return cls(tuple(rules))


def local_offset(t: float) -> float:
    """Seconds east of UTC of the local clock at time `t` (daylight saving included)."""
    return float(time.localtime(t).tm_gmtoff)


def kept(checkpoints: Mapping[int, float], pinned: Iterable[int], now: float,
         schedule: Schedule, offset: Callable[[float], float] = local_offset,
         partial: Iterable[int] = ()) -> set[int]:
    """The checkpoints to keep, of `checkpoints` (number -> creation time, seconds since the
    epoch): the newest, those `pinned` (named snapshots), and those the schedule keeps at time
    `now`. A period's newest is the one with the highest number (clocks of two machines that
    mounted the workspace in turn need not agree; the numbers do). The schedule ignores the
    `partial` ones (published before retention: their objects may be gone)."""
    if not checkpoints:
        return set()
    keep = {max(checkpoints)} | {s for s in pinned if s in checkpoints}
    skip = set(partial)
    for rule in schedule.rules:
        newest: dict[int, int] = {}
        for seq, created in checkpoints.items():
            if now - created >= rule.within or seq in skip:
                continue
            if rule.every is None:
                keep.add(seq)
                continue
            period = math.floor((created + offset(created)) / rule.every)
            if seq > newest.get(period, -1):
                newest[period] = seq
        keep.update(newest.values())
    return keep


UNNAMED = (1, 0)  # the run of an object no checkpoint names: empty


def may_delete(born: int | None, died: int | None, kept: Sequence[int]) -> bool:
    """Whether a data object may leave the store: no checkpoint in `kept` (ascending) names it.

    The checkpoints that may name it are `born`..`died` (see the module docstring): `born`
    None means unknown (an object uploaded by a version that did not record it: from the
    first checkpoint on), `died` None that it is still named by the tree (never deletable).
    An empty run (`born` > `died`: dropped before any checkpoint named it) may go at once.
    """
    if died is None:
        return False
    low = 0 if born is None else born
    if low > died:
        return True
    i = bisect.bisect_left(kept, low)
    return i == len(kept) or kept[i] > died


# -- naming a checkpoint: --at WHEN -------------------------------------------------------

def check_name(name: str) -> str:
    """A snapshot name as given, or BadWhen saying what a name may be."""
    if not NAME_RE.fullmatch(name):
        raise BadWhen(f"the snapshot name {name!r} is not allowed: use a letter, then up to "
                      "63 letters, digits, '.', '_' or '-'")
    return name


# An age in words, for --at: `3 days ago`, `90 minutes`, `1.5h`.
_AGE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|"
                     r"d|days?|w|weeks?)(?:\s+ago)?\s*", re.IGNORECASE)


def parse_time(text: str, now: float) -> float | None:
    """A point in time from `text`: an ISO date or time (local time unless it says its zone:
    `2024-05-01T14:30`, `2024-05-01 14:30:00+02:00`), or an age like `90m`, `2d ago`,
    `3 days ago`. None if `text` is neither."""
    m = _AGE_RE.fullmatch(text)
    if m:
        return now - float(m.group(1)) * UNITS[m.group(2)[0].lower()]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def when_text(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def resolve(when: str, checkpoints: Mapping[int, float], names: Mapping[str, int],
            now: float) -> int:
    """The kept checkpoint `when` names: a checkpoint number (`12` or `#12`), a snapshot
    name, or a time (`parse_time`), which picks the newest checkpoint published at or before
    it. Raises BadWhen with one sentence: an unknown name or number, a time in the future or
    before the first kept checkpoint."""
    text = when.strip()
    if not checkpoints:
        raise BadWhen("the workspace has no checkpoint yet")
    first = min(checkpoints, key=lambda s: (checkpoints[s], s))
    number = text[1:] if text.startswith("#") else text
    if number.isdigit():
        seq = int(number)
        if seq not in checkpoints:
            raise BadWhen(f"checkpoint {seq} is not kept (the kept ones are {span(checkpoints)})")
        return seq
    if NAME_RE.fullmatch(text):
        if text in names:
            seq = names[text]
            if seq not in checkpoints:
                raise BadWhen(f"the snapshot {text!r} names checkpoint {seq}, which is missing "
                              "from the store (run wsfs fsck)")
            return seq
        if parse_time(text, now) is None:
            raise BadWhen(f"there is no snapshot named {text!r}"
                          + (f" (there are: {', '.join(sorted(names))})" if names else ""))
    t = parse_time(text, now)
    if t is None:
        raise BadWhen(f"{when!r} is neither a checkpoint number, a snapshot name nor a time "
                      "(like 2024-05-01T14:30 or 2h ago)")
    if t > now:
        raise BadWhen(f"{when!r} ({when_text(t)}) is in the future")
    if t < checkpoints[first]:
        raise BadWhen(f"{when!r} ({when_text(t)}) is before the first kept checkpoint, "
                      f"#{first} of {when_text(checkpoints[first])}")
    before = [s for s, c in checkpoints.items() if c <= t]
    return max(before, key=lambda s: (checkpoints[s], s))


def span(checkpoints: Mapping[int, float]) -> str:
    """'#3, #7 and #12' for a few, '#3 ... #412 (57 of them)' for many."""
    seqs = sorted(checkpoints)
    if len(seqs) <= 6:
        marks = [f"#{s}" for s in seqs]
        return marks[0] if len(marks) == 1 else ", ".join(marks[:-1]) + " and " + marks[-1]
    return f"#{seqs[0]} ... #{seqs[-1]} ({len(seqs)} of them)"
