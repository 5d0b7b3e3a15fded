"""pgvault._native and pgvault._pure agree with each other and with slow reference versions.

The native comparisons are skipped when the extension is not built, unless
PGVAULT_IMPL=native is set (as in CI), which turns a missing extension into a failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
import sys
import threading
from array import array
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pgvault import _pure as pure
from tests.native.impls import IMPLS, native, requires_native

REPO_ROOT = Path(__file__).resolve().parents[2]
BLCKSZ = 8192
MAX_BLKNO = 0xFFFFFFFF




def cfg(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- Reference versions: direct transcriptions, slow and obviously right ---------------------

BASE_OFFSETS = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A,
    0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA,
    0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE,
    0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
)  # fmt: skip


def ref_checksum_page(page: bytes, blkno: int) -> int:
    """src/include/storage/checksum_impl.h, word by word."""
    page = bytearray(page)
    page[8:10] = b"\0\0"  # pd_checksum reads as zero
    words = struct.unpack("=2048I", page)  # native-endian uint32, like the server
    sums = list(BASE_OFFSETS)

    def comp(s: int, v: int) -> int:
        t = s ^ v
        return ((t * 16777619) ^ (t >> 17)) & 0xFFFFFFFF

    for i in range(64):
        for j in range(32):
            sums[j] = comp(sums[j], words[i * 32 + j])
    for _ in range(2):
        for j in range(32):
            sums[j] = comp(sums[j], 0)
    result = 0
    for s in sums:
        result ^= s
    return ((result ^ blkno) % 65535) + 1


def ref_verify_pages(buf: bytes, first: int) -> list[int]:
    bad = []
    for i in range(len(buf) // BLCKSZ):
        page = buf[i * BLCKSZ : (i + 1) * BLCKSZ]
        stored, upper = header(page)
        if upper != 0 and stored != ref_checksum_page(page, first + i):
            bad.append(first + i)
    return bad


def ref_block_digests(data: bytes, block_size: int) -> bytes:
    return b"".join(xxhash.xxh3_128_digest(data[i : i + block_size]) for i in range(0, len(data), block_size))


def ref_changed_blocks(new: bytes, old: bytes, width: int) -> list[int]:
    return [i for i in range(len(new) // width) if new[i * width : (i + 1) * width] != old[i * width : (i + 1) * width]]


def header(page) -> tuple[int, int]:
    """(pd_checksum, pd_upper), native byte order."""
    return struct.unpack_from("=8xH4xH", page, 0)


# --- Strategies --------------------------------------------------------------------------


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@st.composite
def pages(draw) -> bytes:
    """8 KiB pages: random, constant fill (0xFF words stress carries), or sparse."""
    kind = draw(st.sampled_from(["random", "fill", "sparse"]))
    if kind == "random":
        page = bytearray(random_bytes(draw(st.integers(0, 2**64)), BLCKSZ))
    elif kind == "fill":
        page = bytearray([draw(st.sampled_from([0x00, 0xFF, 0x80, 0x7F, 0x01]))]) * BLCKSZ
    else:
        page = bytearray(BLCKSZ)
        pokes = draw(st.dictionaries(st.integers(0, BLCKSZ - 1), st.integers(0, 255), max_size=40))
        for pos, val in pokes.items():
            page[pos] = val
    if draw(st.booleans()):
        struct.pack_into("=H", page, 8, draw(st.integers(0, 0xFFFF)))  # pd_checksum
    if draw(st.booleans()):
        struct.pack_into("=H", page, 14, draw(st.sampled_from([0, 1, 24, 8192, 0xFFFF])))  # pd_upper
    return bytes(page)


blknos = st.one_of(
    st.integers(0, MAX_BLKNO),
    st.sampled_from([0, 1, 65534, 65535, 65536, 131071, 131072, MAX_BLKNO - 1, MAX_BLKNO]),
)

WRAPPERS = ["bytes", "bytearray", "memoryview", "unaligned", "array", "2d"]


def wrap(kind: str, data: bytes):
    """The same bytes behind different buffer exporters (all C-contiguous)."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "unaligned":  # odd start address
        return memoryview(b"\0" + data)[1:]
    if kind == "array":
        return array("I", data) if len(data) % 4 == 0 else array("B", data)
    if kind == "2d":
        if data and len(data) % 16 == 0:
            return memoryview(data).cast("B", shape=[len(data) // 16, 16])
        return memoryview(data)
    raise AssertionError(kind)


@contextlib.contextmanager
def pure_batch(n: int):
    saved = pure._BATCH
    pure._BATCH = n
    try:
        yield
    finally:
        pure._BATCH = saved


# --- checksum_page ------------------------------------------------------------------------


@cfg(60)
@given(page=pages(), blkno=blknos, kind=st.sampled_from(WRAPPERS))
@example(page=bytes(BLCKSZ), blkno=0, kind="bytes")
@example(page=b"\xff" * BLCKSZ, blkno=MAX_BLKNO, kind="unaligned")
@pytest.mark.parametrize("impl", IMPLS)
def test_checksum_page_matches_reference(impl, page, blkno, kind):
    assert impl.checksum_page(wrap(kind, page), blkno) == ref_checksum_page(page, blkno)


@requires_native
@cfg(500)
@given(page=pages(), blkno=blknos, kind=st.sampled_from(WRAPPERS))
def test_checksum_page_native_equals_pure(page, blkno, kind):
    result = native.checksum_page(wrap(kind, page), blkno)
    assert 1 <= result <= 65535
    assert result == pure.checksum_page(wrap(kind, page), blkno)


@cfg(30)
@given(page=pages(), blkno=blknos, csum=st.integers(0, 0xFFFF))
@pytest.mark.parametrize("impl", IMPLS)
def test_checksum_page_ignores_and_keeps_pd_checksum(impl, page, blkno, csum):
    buf = bytearray(page)
    struct.pack_into("=H", buf, 8, csum)
    before = bytes(buf)
    assert impl.checksum_page(buf, blkno) == impl.checksum_page(page, blkno)
    assert buf == before  # the input is never modified


# --- verify_pages ---------------------------------------------------------------------------


@st.composite
def page_runs(draw, max_pages: int = 10) -> tuple[bytes, int]:
    """A run of pages: valid checksums, wrong ones, corrupted bodies, new and all-zero pages."""
    n = draw(st.integers(0, max_pages))
    first = draw(st.one_of(st.integers(0, MAX_BLKNO - max(n, 1) + 1), st.just(MAX_BLKNO - max(n, 1) + 1)))
    out = bytearray()
    for i in range(n):
        page = bytearray(draw(pages()))
        state = draw(st.sampled_from(["good", "good", "bad_checksum", "corrupt", "new", "zero"]))
        if state == "zero":
            page = bytearray(BLCKSZ)
        else:
            if page[14:16] == b"\0\0":
                struct.pack_into("=H", page, 14, 4096)
            struct.pack_into("=H", page, 8, ref_checksum_page(page, first + i))
            if state == "bad_checksum":
                stored = header(page)[0]
                struct.pack_into("=H", page, 8, stored % 65535 + 1)  # a different valid-looking value
            elif state == "corrupt":
                pos = draw(st.integers(0, BLCKSZ - 1).filter(lambda p: p not in (8, 9, 14, 15)))
                page[pos] ^= draw(st.integers(1, 255))
            elif state == "new":
                struct.pack_into("=H", page, 14, 0)
        out += page
    return bytes(out), first


@cfg(40)
@given(run=page_runs(), kind=st.sampled_from(WRAPPERS))
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("impl", IMPLS)
def test_verify_pages_matches_reference(impl, batch, run, kind):
    buf, first = run
    with pure_batch(batch):
        assert impl.verify_pages(wrap(kind, buf), first) == ref_verify_pages(buf, first)


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_pages_many_pages(impl):
    """Several full pure batches plus a remainder; failures reported with absolute numbers."""
    rng = random.Random(1234)
    npages, first = 300, 5 * 131072 + 17  # e.g. segment 5, block 17
    buf = bytearray(rng.randbytes(npages * BLCKSZ))
    expected = []
    for i in range(npages):
        page = memoryview(buf)[i * BLCKSZ : (i + 1) * BLCKSZ]
        if i % 50 == 7:
            page[:] = bytes(BLCKSZ)  # all-zero: skipped
            continue
        struct.pack_into("=H", page, 14, 8000 if i % 40 else 0)  # every 40th: new, skipped
        struct.pack_into("=H", page, 8, pure.checksum_page(page, first + i))
        if i % 37 == 5:
            page[rng.randrange(16, BLCKSZ)] ^= 0x10
            if i % 40:
                expected.append(first + i)
    assert impl.verify_pages(buf, first) == expected
    if native is not None:
        assert native.verify_pages(buf, first) == pure.verify_pages(buf, first)


@requires_native
@cfg(200)
@given(run=page_runs(max_pages=24), kind=st.sampled_from(WRAPPERS))
def test_verify_pages_native_equals_pure(run, kind):
    buf, first = run
    with pure_batch(5):
        assert native.verify_pages(wrap(kind, buf), first) == pure.verify_pages(wrap(kind, buf), first)


@requires_native
def test_verify_pages_releases_gil():
    """Another Python thread makes progress while native.verify_pages runs."""
    npages = 4096  # 32 MiB of non-new pages: tens of milliseconds of checksumming
    buf = bytearray(npages * BLCKSZ)
    buf[14::BLCKSZ] = b"\x01" * npages  # pd_upper != 0
    for _attempt in range(5):
        done = threading.Event()

        def work(done: threading.Event = done) -> None:
            native.verify_pages(buf, 0)
            done.set()

        t = threading.Thread(target=work)
        spins = 0
        t.start()
        while not done.is_set():
            spins += 1
        t.join()
        # Holding the GIL for the whole call would leave this thread (almost) no turns.
        if spins > 1000:
            return
    pytest.fail(f"main thread spun only {spins} times while verify_pages ran: GIL not released?")


# --- block_digests ------------------------------------------------------------------------


@st.composite
def digest_inputs(draw) -> tuple[bytes, int]:
    length = draw(st.one_of(st.integers(0, 300_000), st.sampled_from([0, 1, 8191, 8192, 8193, 65536])))
    min_bs = max(1, -(-length // 3000))  # at most ~3000 blocks per example
    block_size = draw(
        st.one_of(
            st.integers(min_bs, max(min_bs, 70_000)),
            st.sampled_from([8192, 65536, 1 << 20]).map(lambda b: max(b, min_bs)),
        )
    )
    return random_bytes(draw(st.integers(0, 2**32)), length), block_size


@cfg(60)
@given(inp=digest_inputs(), kind=st.sampled_from(WRAPPERS))
@pytest.mark.parametrize("impl", IMPLS)
def test_block_digests_matches_reference(impl, inp, kind):
    data, block_size = inp
    got = impl.block_digests(wrap(kind, data), block_size)
    assert type(got) is bytes
    assert got == ref_block_digests(data, block_size)
    assert len(got) == 16 * -(-len(data) // block_size)


@requires_native
@cfg(200)
@given(inp=digest_inputs(), kind=st.sampled_from(WRAPPERS))
def test_block_digests_native_equals_pure(inp, kind):
    data, block_size = inp
    assert native.block_digests(wrap(kind, data), block_size) == pure.block_digests(data, block_size)


# --- changed_blocks ---------------------------------------------------------------------------


@st.composite
def digest_pairs(draw) -> tuple[bytes, bytes, int]:
    width = draw(st.sampled_from([1, 4, 8, 16, 16, 32]))
    n_old = draw(st.integers(0, 600))
    old = bytearray(random_bytes(draw(st.integers(0, 2**32)), n_old * width))
    new = bytearray(old)
    for i in draw(st.lists(st.integers(0, max(n_old - 1, 0)), max_size=20)):
        if n_old:
            new[i * width + draw(st.integers(0, width - 1))] ^= draw(st.integers(1, 255))
    n_new = draw(st.one_of(st.just(n_old), st.integers(0, 700)))
    if n_new < n_old:
        del new[n_new * width :]
    else:
        new += random_bytes(n_new, (n_new - n_old) * width)
    return bytes(new), bytes(old), width


@cfg(100)
@given(pair=digest_pairs(), kind=st.sampled_from(["bytes", "bytearray", "memoryview", "unaligned"]))
@pytest.mark.parametrize("impl", IMPLS)
def test_changed_blocks_matches_reference(impl, pair, kind):
    new, old, width = pair
    expected = ref_changed_blocks(new, old, width)
    args = (wrap(kind, new), wrap(kind, old))
    if width == 16:
        assert impl.changed_blocks(*args) == expected
    assert impl.changed_blocks(*args, width) == expected
    assert impl.changed_blocks(*args, width=width) == expected


@requires_native
@cfg(300)
@given(pair=digest_pairs())
def test_changed_blocks_native_equals_pure(pair):
    new, old, width = pair
    assert native.changed_blocks(new, old, width) == pure.changed_blocks(new, old, width)


# --- errors and corner cases: same exception types from both ---------------------------------

PAGE = bytes(BLCKSZ)

BAD_CALLS = [
    ("checksum_page", (b"x" * (BLCKSZ - 1), 0), ValueError),
    ("checksum_page", (b"x" * (BLCKSZ + 1), 0), ValueError),
    ("checksum_page", (b"", 0), ValueError),
    ("checksum_page", (PAGE, -1), ValueError),
    ("checksum_page", (PAGE, 2**32), ValueError),
    ("checksum_page", (PAGE, 2**70), ValueError),
    ("checksum_page", (PAGE, 1.0), TypeError),
    ("checksum_page", (PAGE, "1"), TypeError),
    ("checksum_page", ("x" * BLCKSZ, 0), TypeError),
    ("checksum_page", (None, 0), TypeError),
    ("checksum_page", (memoryview(PAGE * 2)[::2], 0), BufferError),
    ("verify_pages", (b"x" * (BLCKSZ + 1), 0), ValueError),
    ("verify_pages", (PAGE, -1), ValueError),
    ("verify_pages", (PAGE, 2**32), ValueError),
    ("verify_pages", (PAGE * 2, MAX_BLKNO), ValueError),  # second page would be block 2**32
    ("verify_pages", (b"", -1), ValueError),
    ("verify_pages", (PAGE, 0.5), TypeError),
    ("verify_pages", ([0] * BLCKSZ, 0), TypeError),
    ("block_digests", (b"abc", 0), ValueError),
    ("block_digests", (b"abc", -5), ValueError),
    ("block_digests", (b"abc", 2**80), ValueError),
    ("block_digests", (b"abc", 1.5), TypeError),
    ("block_digests", ("abc", 1), TypeError),
    ("changed_blocks", (b"a" * 16, b"a" * 16, 0), ValueError),
    ("changed_blocks", (b"a" * 17, b"a" * 16), ValueError),
    ("changed_blocks", (b"a" * 16, b"a" * 15), ValueError),
    ("changed_blocks", (b"a" * 16, b"a" * 16, "16"), TypeError),
    ("changed_blocks", (b"a" * 16, None), TypeError),
]


@pytest.mark.parametrize("name,args,exc", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise_the_same_types(impl, name, args, exc):
    with pytest.raises(exc):
        getattr(impl, name)(*args)


GOOD_CORNERS = [
    ("verify_pages", (b"", 0), []),
    ("verify_pages", (b"", MAX_BLKNO), []),
    ("verify_pages", (PAGE, MAX_BLKNO), []),  # all-zero page: new, skipped
    ("verify_pages", (PAGE * 3, 7), []),
    ("block_digests", (b"", 1), b""),
    ("block_digests", (b"", 8192), b""),
    ("block_digests", (b"abc", 2**40), xxhash.xxh3_128_digest(b"abc")),
    ("changed_blocks", (b"", b""), []),
    ("changed_blocks", (b"", b"a" * 32), []),
    ("changed_blocks", (b"a" * 32, b""), [0, 1]),
    ("changed_blocks", (b"ab", b"ac", 1), [1]),
    ("checksum_page", (bytearray(BLCKSZ), True), ref_checksum_page(PAGE, 1)),
]


@pytest.mark.parametrize("name,args,expected", GOOD_CORNERS, ids=[f"{c[0]}-{i}" for i, c in enumerate(GOOD_CORNERS)])
@pytest.mark.parametrize("impl", IMPLS)
def test_corner_cases(impl, name, args, expected):
    assert getattr(impl, name)(*args) == expected


def test_impl_names():
    assert pure.IMPL == "python"
    if native is not None:
        assert native.IMPL == "native"


# --- pgvault._accel selection ---------------------------------------------------------------

_PROBE = """
import sys
if {hide_native}:
    sys.modules["pgvault._native"] = None  # makes "import pgvault._native" fail
import pgvault._accel as a
import pgvault._accel as b  # second import: no second warning
print("IMPL=" + a.IMPL)
fns = [a.checksum_page, a.verify_pages, a.block_digests, a.changed_blocks]
assert all(f.__module__ in ("pgvault._native", "pgvault._pure") for f in fns), fns
assert {{f.__module__ for f in fns}} == {{"pgvault._" + ("native" if a.IMPL == "native" else "pure")}}
"""


def run_probe(env_value: str | None, hide_native: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PGVAULT_IMPL", None)
    if env_value is not None:
        env["PGVAULT_IMPL"] = env_value
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", _PROBE.format(hide_native=hide_native)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


def test_accel_python_forced():
    r = run_probe("python")
    assert r.returncode == 0, r.stderr
    assert "IMPL=python" in r.stdout
    assert r.stderr == ""


@requires_native
def test_accel_default_is_native():
    for value in (None, "", "native", " Native "):
        r = run_probe(value)
        assert r.returncode == 0, r.stderr
        assert "IMPL=native" in r.stdout
        assert r.stderr == ""


def test_accel_falls_back_with_one_warning_line():
    r = run_probe(None, hide_native=True)
    assert r.returncode == 0, r.stderr
    assert "IMPL=python" in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "pgvault._native is unavailable" in lines[0] and "pure-Python" in lines[0]


def test_accel_native_forced_but_missing_is_an_error():
    r = run_probe("native", hide_native=True)
    assert r.returncode != 0
    assert "ConfigError" in r.stderr and "PGVAULT_IMPL=native" in r.stderr


def test_accel_rejects_unknown_value():
    r = run_probe("fast")
    assert r.returncode != 0
    assert "ConfigError" in r.stderr and "PGVAULT_IMPL" in r.stderr


@requires_native
def test_entries_refs_native_equals_pure():
    """Index ENTRY records (44 bytes) to REF records (48 bytes) of one pack number, in order."""
    from pgvault import _native, _pure

    for count in (0, 1, 7, 1000):
        body = os.urandom(44 * count)
        for pno in (0, 1, 0x01020304, 0xFFFFFFFF):
            refs = _native.entries_refs(body, pno)
            assert refs == _pure.entries_refs(memoryview(body), pno)
            assert [struct.unpack_from("<32sQII", refs, 48 * k) for k in range(count)] == [
                (*struct.unpack_from("<32sQI", body, 44 * k), pno) for k in range(count)
            ]
    for impl in (_native, _pure):
        with pytest.raises(ValueError):
            impl.entries_refs(b"x" * 45, 0)
