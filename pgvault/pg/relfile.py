"""Which backed-up files are relation data files, and their page numbering.

Every fork of every relation carries page checksums when the cluster has data checksums.
The checksum mixes in the block number within the whole relation, so a segment file's first
page is block segno * RELSEG_SIZE.
"""

from __future__ import annotations

import re

PAGE_SIZE = 8192
RELSEG_PAGES = 131072  # 1 GiB segments of 8 KiB pages

# base/<db>/<relfilenode>[_fork][.segno], global/..., and in a tablespace PG_<ver>_<cat>/<db>/...
_RELATION = re.compile(r"^(?:base/\d+|global|PG_[^/]+/\d+)/\d+(?:_(?:fsm|vm|init))?(?:\.(\d+))?$")


def first_block(path: str) -> int | None:
    """Block number of the file's first page, or None when the file holds no checksummed pages."""
    match = _RELATION.match(path)
    if match is None:
        return None
    return int(match.group(1) or 0) * RELSEG_PAGES


def page_lsn(page: bytes | memoryview) -> int:
    """pd_lsn: xlogid u32, xrecoff u32, in host (little-endian) order."""
    return (int.from_bytes(page[0:4], "little") << 32) | int.from_bytes(page[4:8], "little")
