"""The WAL archive as recovery sees it: segments per timeline, joined by timeline switches.

A backup needs the segments from its start to its stop on its own timeline to be consistent
(backup.py waits for exactly these). Point-in-time recovery beyond the stop follows the newest
timeline that branched off the backup's timeline after the backup started (what
`recovery_target_timeline = latest` does): on each timeline up to the segment before the switch
point, then on the child from the segment holding the switch point (the child's copy of that
segment is the one recovery reads). A switch is therefore not a gap; a missing segment on that
path, before the last archived segment of the final timeline, is.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgvault.pg import timeline, wal


@dataclass(frozen=True)
class Span:
    """Segments lo..hi (inclusive; empty when hi < lo) of one timeline."""

    tli: int
    lo: int
    hi: int


def parse_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file: (parent timeline, switch LSN) for each ancestor, oldest first."""
    return [(switch.tli, switch.end_lsn) for switch in timeline.parse_history(text)]


class WalArchive:
    def __init__(self, names: list[str], histories: dict[int, list[tuple[int, int]]], seg_size: int) -> None:
        self.seg_size = seg_size
        self.histories = histories
        self.segments: dict[int, set[int]] = {}
        for name in names:
            if wal.SEGMENT_RE.match(name):
                tli, segno = wal.parse_segment_name(name, seg_size)
                self.segments.setdefault(tli, set()).add(segno)

    def name(self, tli: int, segno: int) -> str:
        return wal.segment_name(tli, segno, self.seg_size)

    def has(self, tli: int, segno: int) -> bool:
        return segno in self.segments.get(tli, ())

    def last(self) -> str | None:
        """The newest segment: highest timeline, then highest segment number."""
        if not self.segments:
            return None
        tli = max(self.segments)
        return self.name(tli, max(self.segments[tli]))

    def recovery_path(self, tli: int, start_lsn: int) -> list[Span]:
        """The segments recovery from a backup starting at start_lsn on tli would read, to the
        end of the archive."""
        start = start_lsn // self.seg_size
        target = tli
        for child, history in self.histories.items():
            if any(parent == tli and switch >= start_lsn for parent, switch in history):
                target = max(target, child)
        spans = []
        cur_tli, cur_lo = tli, start
        if target != tli:
            chain = self.histories[target]
            first = next(i for i, (parent, _) in enumerate(chain) if parent == tli)
            for i in range(first, len(chain)):
                switch_seg = chain[i][1] // self.seg_size
                spans.append(Span(cur_tli, cur_lo, switch_seg - 1))
                cur_tli = chain[i + 1][0] if i + 1 < len(chain) else target
                cur_lo = switch_seg
        present = self.segments.get(cur_tli)
        spans.append(Span(cur_tli, cur_lo, max(present) if present else cur_lo - 1))
        return spans

    def missing(self, spans: list[Span]) -> list[tuple[int, int]]:
        have = self.segments
        return [(s.tli, n) for s in spans for n in range(s.lo, s.hi + 1) if n not in have.get(s.tli, ())]
