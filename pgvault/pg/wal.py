"""LSN arithmetic and WAL file names, as PostgreSQL defines them (xlog_internal.h)."""

from __future__ import annotations

import re

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
BACKUP_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer position."""
    high, _, low = text.strip().partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segments_per_id(seg_size: int) -> int:
    return 0x100000000 // seg_size


def segment_name(tli: int, segno: int, seg_size: int) -> str:
    per = segments_per_id(seg_size)
    return f"{tli:08X}{segno // per:08X}{segno % per:08X}"


def parse_segment_name(name: str, seg_size: int) -> tuple[int, int]:
    """'000000010000000200000003' -> (timeline, segment number)."""
    if not SEGMENT_RE.match(name[:24]):
        raise ValueError(f"not a WAL segment name: {name!r}")
    return int(name[:8], 16), int(name[8:16], 16) * segments_per_id(seg_size) + int(name[16:24], 16)


def segment_of(lsn: int, seg_size: int) -> int:
    return lsn // seg_size


def segments_between(tli: int, start_lsn: int, stop_lsn: int, seg_size: int) -> list[str]:
    """Segments holding [start_lsn, stop_lsn): the WAL a backup needs to be consistent.

    The stop segment is the one holding the byte before stop_lsn, as pg_backup_stop's own
    wait-for-archive uses (XLByteToPrevSeg).
    """
    first = segment_of(start_lsn, seg_size)
    last = segment_of(max(stop_lsn - 1, start_lsn), seg_size)
    return [segment_name(tli, n, seg_size) for n in range(first, last + 1)]


def parse_size(text: str) -> int:
    """A GUC size as SHOW prints it ('16MB', '1GB', '64kB') -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kMGT]?B)?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = {"B": 1, "kB": 1024, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, None: 1}[match.group(2)]
    return int(match.group(1)) * unit


def wal_file_kind(name: str) -> str:
    """'segment', 'partial', 'backup' or 'history'; ValueError for anything else."""
    if SEGMENT_RE.match(name):
        return "segment"
    if PARTIAL_RE.match(name):
        return "partial"
    if BACKUP_RE.match(name):
        return "backup"
    if HISTORY_RE.match(name):
        return "history"
    raise ValueError(f"not a WAL file name: {name!r}")


# Long page header of the first page of every segment (XLogLongPageHeaderData):
# xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr u64, xlp_rem_len u32, pad u32,
# then xlp_sysid u64 at offset 24, xlp_seg_size u32, xlp_xlog_blcksz u32.
def segment_system_id(first_page: bytes) -> int | None:
    """The system identifier stamped on a WAL segment, or None if it has no long header."""
    if len(first_page) < 40:
        return None
    info = int.from_bytes(first_page[2:4], "little")
    if not info & 0x0002:  # XLP_LONG_HEADER
        return None
    return int.from_bytes(first_page[24:32], "little")
