"""Throughput of the native vs pure-Python hot loops (not a test; run by hand).

    python native/bench.py [--mb 100] [--threads 2]

Needs the built extension importable as pgvault._native for the native rows.
Pages are random with valid checksums (worst case: every page is verified).
"""

from __future__ import annotations

import argparse
import importlib
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType

from pgvault import _pure

_native: ModuleType | None
try:
    _native = importlib.import_module("pgvault._native")
except ImportError:  # pragma: no cover
    _native = None

BLCKSZ = 8192


def make_pages(npages: int) -> bytes:
    buf = bytearray(os.urandom(npages * BLCKSZ))
    fn = (_native or _pure).checksum_page
    for i in range(npages):
        off = i * BLCKSZ
        buf[off + 14 : off + 16] = (8192).to_bytes(2, "little")  # pd_upper != 0: not new
        buf[off + 8 : off + 10] = fn(buf[off : off + BLCKSZ], i).to_bytes(2, "little")
    return bytes(buf)


def rate(fn: Callable[[], object], nbytes: int, min_seconds: float = 1.0) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n * nbytes / elapsed / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    npages = args.mb * 1_000_000 // BLCKSZ
    data = make_pages(npages)
    nbytes = len(data)
    impls = [m for m in (_native, _pure) if m is not None]
    print(f"{nbytes / 1e6:.0f} MB of pages")
    for m in impls:
        # The pure path is slow: time it on a slice to keep the run short.
        part = data if m is _native else data[: min(nbytes, 16 * 1024 * 1024)]
        assert m.verify_pages(part, 0) == []
        r = rate(partial(m.verify_pages, part, 0), len(part))
        print(f"verify_pages   {m.IMPL:6}  {r:8.0f} MB/s")
    if _native is not None and args.threads > 1:

        def run_threads() -> None:
            ts = [threading.Thread(target=_native.verify_pages, args=(data, 0)) for _ in range(args.threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        r = rate(run_threads, nbytes * args.threads)
        print(f"verify_pages   native  {r:8.0f} MB/s aggregate over {args.threads} threads")
    page = data[:BLCKSZ]
    for m in impls:
        r = rate(partial(m.checksum_page, page, 0), BLCKSZ, 0.5)
        print(f"checksum_page  {m.IMPL:6}  {r:8.0f} MB/s  ({BLCKSZ / r:.1f} us/page)")
    for bs in (8192, 65536, 1 << 20):
        for m in impls:
            r = rate(partial(m.block_digests, data, bs), nbytes)
            print(f"block_digests  {m.IMPL:6}  block_size={bs:>7}  {r:8.0f} MB/s")
    new = _native.block_digests(data, BLCKSZ) if _native else _pure.block_digests(data, BLCKSZ)
    damaged = bytearray(new)
    for i in range(0, len(damaged), 16 * 97):
        damaged[i] ^= 1
    old = bytes(damaged)
    for m in impls:
        r = rate(partial(m.changed_blocks, new, old), len(new) // 16, 0.5)
        print(f"changed_blocks {m.IMPL:6}  {r:8.1f} M digests/s (1% changed)")


if __name__ == "__main__":
    main()
