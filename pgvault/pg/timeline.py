"""Timeline history files ('00000002.history'): which timelines a timeline descends from.

Each line is ``parent_tli<TAB>switch_lsn<TAB>reason``: WAL of parent_tli up to switch_lsn
belongs to the history of this timeline. Comments (#) and blank lines are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgvault.pg.wal import parse_lsn

INFINITE_LSN = (1 << 64) - 1


@dataclass(frozen=True)
class Switch:
    tli: int  # an ancestor timeline
    end_lsn: int  # where this history left it


def history_name(tli: int) -> str:
    return f"{tli:08X}.history"


def parse_history(text: str) -> list[Switch]:
    """The ancestors of a timeline, oldest first; ValueError on a malformed file."""
    switches = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit():
            raise ValueError(f"malformed timeline history line {line!r}")
        switches.append(Switch(int(fields[0]), parse_lsn(fields[1])))
    return switches


def lineage(tli: int, history: list[Switch]) -> dict[int, int]:
    """Timeline -> the LSN up to which its WAL belongs to ``tli``'s history (tli itself: infinite)."""
    ranges = {s.tli: s.end_lsn for s in history}
    ranges[tli] = INFINITE_LSN
    return ranges
