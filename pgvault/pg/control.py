"""The few fields of global/pg_control that backup selection needs (pg_control.h).

ControlFileData starts with system_identifier u64, pg_control_version u32,
catalog_version_no u32, state i32, time i64 (offset 24), checkPoint u64 (32), then the
CheckPoint copy at 40: redo u64, ThisTimeLineID u32, PrevTimeLineID u32, fullPageWrites
bool (+ wal_level i32 from PostgreSQL 17, inside what was padding), then nextXid, a 64-bit
FullTransactionId, at offset 64 on every supported version (14 to 18; pinned by a test
against pg_controldata).
"""

from __future__ import annotations

NEXT_XID_OFFSET = 64


def next_xid(control: bytes) -> int:
    """The start checkpoint's next transaction id (epoch << 32 | xid)."""
    if len(control) < NEXT_XID_OFFSET + 8:
        raise ValueError("pg_control is too short")
    return int.from_bytes(control[NEXT_XID_OFFSET : NEXT_XID_OFFSET + 8], "little")
