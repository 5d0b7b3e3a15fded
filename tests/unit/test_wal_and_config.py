from __future__ import annotations

from pathlib import Path

import pytest

from pgvault.config import resolve
from pgvault.errors import ConfigError
from pgvault.pg import recovery, wal

SEG = 16 * 1024 * 1024


def test_lsn_roundtrip() -> None:
    assert wal.parse_lsn("16/B374D848") == 0x16B374D848
    assert wal.format_lsn(0x16B374D848) == "16/B374D848"


def test_segment_names() -> None:
    assert wal.segment_name(1, 0x1FF, SEG) == "0000000100000001000000FF"
    assert wal.parse_segment_name("0000000100000001000000FF", SEG) == (1, 0x1FF)
    # The stop segment is the one holding the byte before the stop LSN.
    assert wal.segments_between(1, 0x6000028, 0x7000000, SEG) == ["000000010000000000000006"]
    assert wal.segments_between(1, 0x6000028, 0x7000001, SEG)[-1] == "000000010000000000000007"
    assert wal.segment_name(2, 5, 1024 * 1024 * 1024) == "000000020000000100000001"


def test_wal_file_kinds() -> None:
    assert wal.wal_file_kind("000000010000000000000006") == "segment"
    assert wal.wal_file_kind("00000002.history") == "history"
    assert wal.wal_file_kind("000000010000000000000006.partial") == "partial"
    assert wal.wal_file_kind("000000010000000000000006.00000028.backup") == "backup"
    with pytest.raises(ValueError):
        wal.wal_file_kind("../../etc/passwd")


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    conf = tmp_path / "pgvault.conf"
    conf.write_text("[global]\njobs = 3\nrepo = /from/file\ncompress = lz4\n[main]\njobs = 5\n")
    env = {"PGVAULT_CONFIG": str(conf), "PGVAULT_REPO": "/from/env"}
    opts = resolve("backup", (), {"stanza": "main"}, env)
    assert (opts.jobs, opts.repo, opts.compress) == (5, "/from/env", "lz4")
    opts = resolve("backup", (), {"stanza": "main", "jobs": "7", "repo": "/flag"}, env)
    assert (opts.jobs, opts.repo) == (7, "/flag")


def test_config_errors(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("[global]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        resolve("info", (), {"config": str(conf)}, {})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("info", (), {"config": str(tmp_path / "none")}, {})
    with pytest.raises(ConfigError, match="jobs"):
        resolve("info", (), {"jobs": "zero"}, {})


def test_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    opts = resolve("info", (), {"passphrase-file": str(secret)}, {})
    assert opts.passphrase == b"s3cret"
    assert "s3cret" not in repr(opts)


def test_recovery_settings_are_not_stacked(tmp_path: Path) -> None:
    (tmp_path / "postgresql.auto.conf").write_text("work_mem = '8MB'\nrestore_command = 'old'\n")
    settings = recovery.RecoverySettings("pgvault wal-fetch %f %p", (("recovery_target_xid", "123"),), "recovery.signal")
    recovery.write(tmp_path, settings)
    recovery.write(tmp_path, settings)
    text = (tmp_path / "postgresql.auto.conf").read_text()
    assert text.count("restore_command") == 1 and text.count("recovery_target_xid") == 1
    assert "work_mem = '8MB'" in text and "'old'" not in text
    assert (tmp_path / "recovery.signal").exists()


def test_relation_files_and_block_numbers() -> None:
    from pgvault.pg.relfile import RELSEG_PAGES, first_block

    assert first_block("base/5/16384") == 0
    assert first_block("base/5/16384.3") == 3 * RELSEG_PAGES
    assert first_block("base/5/16384_fsm") == 0
    assert first_block("global/1262_vm") == 0
    assert first_block("PG_17_202406281/5/16390.1") == RELSEG_PAGES
    for other in ("base/5/pg_filenode.map", "base/5/PG_VERSION", "global/pg_control", "pg_xact/0000", "base/5/t3_16384"):
        assert first_block(other) is None
