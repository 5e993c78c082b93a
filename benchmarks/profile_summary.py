"""Summarise a py-spy `--format raw` profile (collapsed stacks) of the wsfs daemon.

    python benchmarks/profile_summary.py benchmarks/results/profile-a-0.txt [--top 25]

Prints, per thread kind (the trio thread that runs the FUSE handlers vs worker threads), the
functions with the largest share of samples: inclusive (the function or anything it called)
and self (the function's own line), so a hot spot shows up with its callers.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """'read (wsfs/fs.py:512)' -> 'fs.py:read'; keep others' module names short too."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    if "/wsfs/" in path or path.startswith("wsfs/"):
        path = "wsfs/" + path.split("wsfs/", 1)[1]
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{path}:{m.group('func')}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    by_thread: dict[str, tuple[Counter[str], Counter[str], list[int]]] = {}
    for line in args.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        # Worker threads start in threading's bootstrap; everything else is the trio thread.
        kind = ("worker threads" if frames[0].startswith("threading.py")
                else "trio thread (FUSE handlers, flusher bookkeeping)")
        incl, own, total = by_thread.setdefault(kind, (Counter(), Counter(), [0]))
        n = int(count)
        total[0] += n
        for f in set(frames):
            incl[f] += n
        own[frames[-1]] += n
    grand = sum(t[2][0] for t in by_thread.values())
    print(f"{args.profile}: {grand} samples")
    for kind, (incl, own, total) in sorted(by_thread.items(), key=lambda kv: -kv[1][2][0]):
        print(f"\n== {kind}: {total[0]} samples ({100 * total[0] / grand:.0f}% of all)")
        print("  inclusive:")
        for f, n in incl.most_common(args.top):
            print(f"   {100 * n / total[0]:5.1f}%  {f}")
        print("  self:")
        for f, n in own.most_common(args.top // 2):
            print(f"   {100 * n / total[0]:5.1f}%  {f}")


if __name__ == "__main__":
    main()
