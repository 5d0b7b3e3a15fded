"""In-memory backend: the fake every test can use, and the reference for the contract."""

from __future__ import annotations

import threading
from typing import Iterator

from pgvault.backends.base import ObjectInfo, ObjectNotFound, Properties


class MemoryBackend:
    properties = Properties(atomic_put_if_absent=True, connections=8, local=False)

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "memory://"

    def put(self, key: str, data: bytes | bytearray) -> None:
        with self._lock:
            self._objects[key] = bytes(data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = bytes(data)
            return True

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFound(f"object {key} not found") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key)[offset : offset + length]

    def stat(self, key: str) -> ObjectInfo | None:
        with self._lock:
            data = self._objects.get(key)
        return None if data is None else ObjectInfo(key, len(data))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted((k, len(v)) for k, v in self._objects.items() if k.startswith(prefix))
        return iter([ObjectInfo(k, size) for k, size in items])

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)
