"""The hot loops, native when possible: import them from here, never from _native or _pure.

    from pgvault._accel import checksum_page, verify_pages, block_digests, changed_blocks, IMPL
    from pgvault._accel import index_build, index_merge, index_find
    from pgvault._accel import index_locate, refs_sort, refs_runs, open_blocks, writeback  # the read path

``PGVAULT_IMPL`` selects the implementation, read once at first import:

* unset or empty -- ``pgvault._native`` (built from native/_pgvault_native.pyx) if it imports,
  else ``pgvault._pure`` with one warning line on the ``pgvault.accel`` logger;
* ``native`` -- the extension or a ConfigError (a build that should have it but does not);
* ``python`` -- the pure-Python implementation (tests, debugging, exotic platforms).

Both implementations give identical results and raise identical exception types; see
``pgvault._pure`` for the semantics (notably: ``verify_pages`` takes the block number within
the whole relation, ``segno * 131072 + block_in_segment``, not within the segment file).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING

from pgvault.errors import ConfigError

__all__ = [
    "IMPL", "NATIVE_IMPORT_ERROR", "block_digests", "changed_blocks", "checksum_page", "index_build", "index_find",
    "index_merge", "verify_pages",
    "index_locate", "open_blocks", "refs_runs", "refs_sort", "writeback",  # the read path
]

ENV_VAR = "PGVAULT_IMPL"

log = logging.getLogger("pgvault.accel")

# Why the native module could not be imported, when it was tried and failed (for diagnostics).
NATIVE_IMPORT_ERROR: str | None = None


def _select() -> object:
    global NATIVE_IMPORT_ERROR
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice not in ("", "native", "python"):
        raise ConfigError(f"{ENV_VAR}={choice!r} is not one of 'native', 'python' (or unset)")
    if choice == "python":
        return importlib.import_module("pgvault._pure")
    try:
        return importlib.import_module("pgvault._native")
    except ImportError as exc:
        NATIVE_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        if choice == "native":
            raise ConfigError(
                f"{ENV_VAR}=native but the native module pgvault._native is unavailable "
                f"({NATIVE_IMPORT_ERROR}); rebuild/reinstall pgvault or unset {ENV_VAR}"
            ) from exc
    log.warning(
        "native module pgvault._native is unavailable (%s); using the much slower pure-Python "
        "fallback for page checksums and block digests",
        NATIVE_IMPORT_ERROR,
    )
    return importlib.import_module("pgvault._pure")


if TYPE_CHECKING:
    from pgvault._pure import (
        IMPL, block_digests, changed_blocks, checksum_page, index_build, index_find, index_merge, verify_pages,
    )
    from pgvault._pure import index_locate, open_blocks, refs_runs, refs_sort, writeback  # the read path
else:
    _impl = _select()
    IMPL: str = _impl.IMPL
    checksum_page = _impl.checksum_page
    verify_pages = _impl.verify_pages
    block_digests = _impl.block_digests
    changed_blocks = _impl.changed_blocks
    index_build = _impl.index_build
    index_merge = _impl.index_merge
    index_find = _impl.index_find
    # the read path
    index_locate = _impl.index_locate
    refs_sort = _impl.refs_sort
    refs_runs = _impl.refs_runs
    open_blocks = _impl.open_blocks
    writeback = _impl.writeback
    del _impl
