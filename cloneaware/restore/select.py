"""Which entries a restore makes, and where: ``restore --include PATTERN``
(patterns.py; an included directory comes whole) and
``--strip-components N`` (the first N components of each path dropped, as
tar drops them; an entry with no more than N is not made).

The directories above an included entry are made too, with their own
metadata.  A file that is not restored but whose bytes a restored file
shares (it is marked as referenced in the archive), or that a restored hard
link names, is restored under a temporary name in DEST's staging directory
(``.cloneaware-staging-PID-XXXXXXXX``) and removed at the end: the restored
files clone from it, so they still share their extents with each other,
and a hard link keeps its data.  The restore needs room for those files
while it runs; a staging directory left by a killed restore is removed by
the next one into the same DEST."""
from __future__ import annotations

import re
from typing import NamedTuple

from cloneaware.archive import format as fmt
from cloneaware.patterns import Chooser, Patterns

STAGING = re.compile(rb"\.cloneaware-staging-(\d+)-[0-9a-f]{8}\Z")


class Selection:
    def __init__(self, include: list[str] | None = None, strip: int = 0):
        self.patterns = Patterns(include or [])
        self.strip = strip
        self.chooser = Chooser(self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns) or self.strip > 0

    def what(self) -> str:
        """The choice as the user gave it, for messages."""
        parts = [f"--include {p.text}" for p in self.patterns.patterns]
        if self.strip:
            parts.append(f"--strip-components {self.strip}")
        return " ".join(parts)

    def fresh(self) -> Selection:
        """The same choice, for another pass over the entries."""
        return Selection([p.text for p in self.patterns.patterns], self.strip)

    def take(self, path: bytes, kind: int) -> bool:
        """Is this entry (in archive order) among those chosen?  (Not yet
        whether it is made: see ``mapped``.)"""
        return not self.patterns or self.chooser.take(path, kind == fmt.K_DIR)

    def mapped(self, path: bytes) -> bytes | None:
        """Where ``path`` goes below DEST, or None (stripped away)."""
        if not self.strip:
            return path
        parts = path.split(b"/")
        return b"/".join(parts[self.strip:]) if len(parts) > self.strip else None


class Plan(NamedTuple):
    """What a restore with a Selection makes, from the whole list of entries
    (a seekable archive, a manifest)."""

    tops: set[bytes]  # the top-level names it makes below DEST
    taken: set[int]  # the ids of the entries chosen
    stage: set[int]  # files left out that a chosen hard link names (staged)


def plan(select: Selection, entries: list[fmt.Entry]) -> Plan:
    """The choice applied to every entry, in archive order (a fresh walk
    state: ``select`` itself is left as it was)."""
    sel = select.fresh()
    taken: set[int] = set()
    tops: set[bytes] = set()
    for e in entries:
        if sel.take(e.path, e.kind):
            to = sel.mapped(e.path)
            if to is not None:
                taken.add(e.id)
                tops.add(to.partition(b"/")[0])
    stage = {e.link for e in entries if e.kind == fmt.K_HARDLINK and e.id in taken
             and e.link not in taken}
    return Plan(tops, taken, stage)
