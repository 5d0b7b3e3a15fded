"""Page checksums against a real cluster made by ``initdb --data-checksums``.

initdb refuses to run as root: as root these tests are skipped (run them as an unprivileged
user, e.g. via scripts/test.sh), unless PGVAULT_REQUIRE_PG=1 turns the skip into a failure.
The server is never started; pg_checksums (PostgreSQL's own verifier) cross-checks us.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgvault import _pure as pure
from tests.native.impls import IMPLS, native

BLCKSZ = 8192
RELSEG_SIZE = 131072

pytestmark = pytest.mark.integration



# Relation data files: <relfilenode>[_fsm|_vm|_init][.<segno>] (what pg_checksums checks).
REL_FILE = re.compile(r"^(\d+)(?:_(?:fsm|vm|init))?(?:\.(\d+))?$")


def _skip_or_fail(msg: str) -> None:
    if os.environ.get("PGVAULT_REQUIRE_PG") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _pg_bindir() -> Path | None:
    candidates = [os.environ.get("PGVAULT_PG15_BINDIR"), "/usr/lib/postgresql/15/bin"]
    for c in candidates:
        if c and os.access(Path(c) / "initdb", os.X_OK):
            return Path(c)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture(scope="module")
def bindir() -> Path:
    if os.geteuid() == 0:
        _skip_or_fail("initdb refuses to run as root; run these tests as an unprivileged user (scripts/test.sh)")
    found = _pg_bindir()
    if found is None:
        _skip_or_fail("PostgreSQL binaries not found (set PGVAULT_PG15_BINDIR or install postgresql-15)")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def cluster(bindir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("native-initdb") / "data"
    env = dict(os.environ, LC_ALL="C", LANG="C")
    r = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "--data-checksums", "-A", "trust", "-U", "postgres",
         "-E", "UTF8", "--locale=C", "--no-sync"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"initdb failed:\n{r.stdout}\n{r.stderr}"
    return data


def relation_files(cluster: Path) -> Iterator[tuple[Path, int]]:
    """(path, segment number) of the data files in base/1 (template1) and global/."""
    for sub in ("base/1", "global"):
        for p in sorted((cluster / sub).iterdir()):
            m = REL_FILE.match(p.name)
            if m and p.is_file() and p.stat().st_size:
                yield p, int(m.group(2) or 0)


def non_new_pages(data: bytes) -> list[int]:
    return [i for i in range(len(data) // BLCKSZ) if struct.unpack_from("=H", data, i * BLCKSZ + 14)[0] != 0]


def pg_checksums_failures(bindir: Path, data_dir: Path) -> list[tuple[str, int, int, int]]:
    """Run pg_checksums --check; (file name, block in segment, calculated, stored) per failure."""
    r = subprocess.run(
        [str(bindir / "pg_checksums"), "--check", "-D", str(data_dir)],
        env=dict(os.environ, LC_ALL="C", LANG="C"), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    pattern = re.compile(
        r'checksum verification failed in file "([^"]+)", block (\d+): '
        r"calculated checksum ([0-9A-F]+) but block contains ([0-9A-F]+)"
    )
    failures = [
        (Path(m.group(1)).name, int(m.group(2)), int(m.group(3), 16), int(m.group(4), 16))
        for m in pattern.finditer(r.stderr)
    ]
    if failures:
        assert r.returncode != 0
    else:
        assert r.returncode == 0, f"pg_checksums failed:\n{r.stdout}\n{r.stderr}"
        assert "Bad checksums:  0" in r.stdout or "Bad checksums: 0" in r.stdout, r.stdout
    return failures


def largest_relation(cluster: Path) -> tuple[Path, bytes]:
    path = max((p for p, seg in relation_files(cluster) if "/base/" in str(p) and "_" not in p.name),
               key=lambda p: p.stat().st_size)  # fmt: skip
    return path, path.read_bytes()


def test_cluster_is_valid_per_pg_checksums(bindir, cluster):
    assert pg_checksums_failures(bindir, cluster) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_real_relation_files_verify(impl, cluster):
    files = pages = 0
    for path, segno in relation_files(cluster):
        data = path.read_bytes()
        assert len(data) % BLCKSZ == 0, path
        assert impl.verify_pages(data, segno * RELSEG_SIZE) == [], path
        files += 1
        pages += len(non_new_pages(data))
    assert files >= 20 and pages >= 100, (files, pages)  # not vacuous


@pytest.mark.parametrize("impl", IMPLS)
def test_stored_checksum_equals_computed(impl, cluster):
    """The known constant: a real page's pd_checksum, as written by the server."""
    path, data = largest_relation(cluster)
    checked = 0
    for blkno in non_new_pages(data)[:20]:
        page = data[blkno * BLCKSZ : (blkno + 1) * BLCKSZ]
        stored = struct.unpack_from("=H", page, 8)[0]
        assert stored != 0
        assert impl.checksum_page(page, blkno) == stored, (path.name, blkno)
        checked += 1
    assert checked >= 3
    # The same page claimed at other block numbers (a transposed page) fails.
    page = data[:BLCKSZ]
    stored = struct.unpack_from("=H", page, 8)[0]
    assert any(impl.checksum_page(page, b) != stored for b in (1, 2, 3, RELSEG_SIZE))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [0, 9, 20, 4000, BLCKSZ - 1], ids=lambda o: f"byte{o}")
def test_flipped_byte_detected_at_right_block(impl, cluster, offset):
    _, data = largest_relation(cluster)
    candidates = non_new_pages(data)
    assert len(candidates) >= 3
    victim = candidates[2]
    buf = bytearray(data)
    buf[victim * BLCKSZ + offset] ^= 0x01

    def fails(blkno: int, i: int) -> bool:
        # A 16-bit checksum misses 1 corruption in 65535: ask the other implementation
        # (itself checked against a transcription of checksum_impl.h and against pg_checksums).
        other = native if impl is pure and native is not None else pure
        page = buf[i * BLCKSZ : (i + 1) * BLCKSZ]
        return other.checksum_page(page, blkno) != struct.unpack_from("=H", page, 8)[0]

    expected = [victim] if offset in (8, 9) or fails(victim, victim) else []
    assert impl.verify_pages(buf, 0) == expected
    assert expected or offset not in (8, 9)
    # The same bytes as segment 3: block numbers are relation-absolute, so now every
    # non-new page carries the wrong block number and fails.
    first = 3 * RELSEG_SIZE
    expected3 = [first + i for i in candidates if fails(first + i, i)]
    assert len(expected3) >= len(candidates) - 2
    assert impl.verify_pages(buf, first) == expected3
    # Only that page's piece of the buffer, with its absolute block number.
    one = buf[victim * BLCKSZ : (victim + 1) * BLCKSZ]
    assert impl.verify_pages(one, victim) == expected
    assert impl.verify_pages(data[victim * BLCKSZ : (victim + 1) * BLCKSZ], victim) == []


def test_corruption_matches_pg_checksums(bindir, cluster, tmp_path):
    """Corrupt copies of real pages; our verdicts and computed checksums equal pg_checksums'."""
    copy = tmp_path / "data"
    shutil.copytree(cluster, copy, symlinks=True)
    copy.chmod(0o700)
    path, data = largest_relation(copy)
    candidates = non_new_pages(data)
    victims = {candidates[1]: 100, candidates[-1]: BLCKSZ - 2}
    buf = bytearray(data)
    for blkno, off in victims.items():
        buf[blkno * BLCKSZ + off] ^= 0x80
    path.write_bytes(buf)

    failures = pg_checksums_failures(bindir, copy)
    assert {name for name, _, _, _ in failures} <= {path.name}
    reported = sorted(blk for _, blk, _, _ in failures)
    assert set(reported) <= set(victims) and reported  # (a 16-bit checksum may miss one)
    impls = [pure] + ([native] if native is not None else [])
    for impl in impls:
        assert impl.verify_pages(buf, 0) == reported
        for _, blkno, calculated, stored in failures:
            page = buf[blkno * BLCKSZ : (blkno + 1) * BLCKSZ]
            assert impl.checksum_page(page, blkno) == calculated
            assert struct.unpack_from("=H", page, 8)[0] == stored


@pytest.mark.parametrize("impl", IMPLS)
def test_new_pages_are_skipped(impl, cluster):
    _, data = largest_relation(cluster)
    n = len(data) // BLCKSZ
    zero = bytes(BLCKSZ)
    new_but_dirty = bytearray(data[:BLCKSZ])
    new_but_dirty[14:16] = b"\0\0"  # pd_upper = 0: PageIsNew, skipped whatever its checksum
    buf = data + zero + bytes(new_but_dirty) + zero
    assert impl.verify_pages(buf, 0) == []
    # Whereas page 0 appended at block n is checked (and fails, barring a 1-in-65535 collision).
    page0 = data[:BLCKSZ]
    collides = pure.checksum_page(page0, n) == struct.unpack_from("=H", page0, 8)[0]
    assert impl.verify_pages(data + page0, 0) == ([] if collides else [n])
