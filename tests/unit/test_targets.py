"""Recovery target parsing and timeline history files (no server needed)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pgvault.errors import ConfigError
from pgvault.ops import targets
from pgvault.pg import timeline


def test_time_targets_are_normalized_to_utc() -> None:
    target = targets.parse("time", "2026-11-23 14:03:00.5+01", None, False)
    assert target.time == datetime(2026, 11, 23, 13, 3, 0, 500000, tzinfo=timezone.utc)
    assert target.value == "2026-11-23 13:03:00.500000+00"
    assert targets.parse("time", "2026-11-23T13:03:00Z", None, True).time == datetime(2026, 11, 23, 13, 3, tzinfo=timezone.utc)


def test_a_time_without_zone_is_local_time() -> None:
    naive = datetime(2026, 6, 1, 12, 0)
    assert targets.parse("time", "2026-06-01 12:00:00", None, False).time == naive.astimezone().astimezone(timezone.utc)


@pytest.mark.parametrize(
    ("kind", "value", "timeline", "exclusive", "words"),
    [
        ("time", "noon", None, False, "is not a time"),
        ("lsn", "0-1", None, False, "is not an LSN"),
        ("xid", "-5", None, False, "is not a transaction id"),
        ("xid", "2", None, False, "is not a transaction id"),
        ("name", "x" * 64, None, False, "at most 63"),
        ("name", None, None, False, "needs --target"),
        ("immediate", "x", None, False, "only valid with --type time"),
        ("name", "x", None, True, "--target-exclusive is only valid"),
        ("default", None, "0", False, "must be current, latest or a timeline number"),
        ("bogus", None, None, False, "must be one of"),
    ],
)
def test_bad_targets_are_config_errors(kind: str, value: str | None, timeline: str | None, exclusive: bool, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        targets.parse(kind, value, timeline, exclusive)


def test_lsn_and_xid_targets() -> None:
    assert targets.parse("lsn", "1/2000028", "latest", True).lsn == (1 << 32) | 0x2000028
    assert targets.parse("xid", "12345", "3", False).xid == 12345


def test_history_file_lineage() -> None:
    text = "1\t0/3000158\tno recovery target specified\n\n# comment\n2\t0/5000000\tat restore point \"x\"\n"
    history = timeline.parse_history(text)
    assert history == [timeline.Switch(1, 0x3000158), timeline.Switch(2, 0x5000000)]
    assert timeline.lineage(3, history) == {1: 0x3000158, 2: 0x5000000, 3: timeline.INFINITE_LSN}
    with pytest.raises(ValueError):
        timeline.parse_history("garbage\n")
