"""Where each block lives: block id -> (pack, offset, length).

Persisted as one index object per pack, written right after the pack, so the index on the
backend only ever names packs that exist. Loaded whole at open: ~60 bytes per block in RAM.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Iterable

from pgvault.errors import IntegrityError

ENTRY = struct.Struct("<32sQI")  # block id, offset in pack, stored length
ID_SIZE = 32


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int


def encode_entries(pack: str, entries: Iterable[tuple[bytes, int, int]]) -> bytes:
    name = pack.encode("ascii")
    out = bytearray(struct.pack("<H", len(name)) + name)
    for block_id, offset, length in entries:
        out += ENTRY.pack(block_id, offset, length)
    return bytes(out)


def decode_entries(data: bytes) -> tuple[str, list[tuple[bytes, int, int]]]:
    (name_len,) = struct.unpack_from("<H", data)
    pack = data[2 : 2 + name_len].decode("ascii")
    body = memoryview(data)[2 + name_len :]
    if len(body) % ENTRY.size:
        raise IntegrityError(f"index for pack {pack} is truncated")
    return pack, [ENTRY.unpack_from(body, pos) for pos in range(0, len(body), ENTRY.size)]


class Index:
    """Thread-safe map of block ids to locations."""

    def __init__(self) -> None:
        self._map: dict[bytes, Location] = {}
        self._lock = threading.Lock()

    def __contains__(self, block_id: bytes) -> bool:
        return block_id in self._map

    def __len__(self) -> int:
        return len(self._map)

    def get(self, block_id: bytes) -> Location | None:
        return self._map.get(block_id)

    def add_pack(self, pack: str, entries: Iterable[tuple[bytes, int, int]]) -> None:
        with self._lock:
            for block_id, offset, length in entries:
                self._map.setdefault(block_id, Location(pack, offset, length))
