"""Both implementations of the hot loops, as pytest parameters, for every native test."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from pgvault import _pure as pure


def _load_native() -> ModuleType | None:
    try:
        from pgvault import _native
    except ImportError as exc:
        if os.environ.get("PGVAULT_IMPL", "").strip().lower() == "native":
            raise RuntimeError(f"PGVAULT_IMPL=native but pgvault._native is not importable: {exc}") from exc
        return None
    return _native


native = _load_native()
requires_native = pytest.mark.skipif(
    native is None,
    reason="pgvault._native is not built (native/build.md); PGVAULT_IMPL=native makes this fail",
)
IMPLS = [pytest.param(pure, id="python"), pytest.param(native, id="native", marks=requires_native)]
