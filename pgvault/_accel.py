"""The hot loops, native when possible: import them from here, never from _native or _pure.

    from pgvault._accel import checksum_page, verify_pages, block_digests, changed_blocks, IMPL
    from pgvault._accel import index_build, index_merge, index_find
    from pgvault._accel import index_locate, refs_sort, refs_runs, open_blocks, writeback  # the read path
    from pgvault._accel import entries_refs  # verify
    from pgvault._accel import block_ids, seal_blocks  # the write path
    from pgvault._accel import bucket_fill, bucket_records, disk_locate  # the index on disk

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

import os

from pgvault.errors import ConfigError

# typing.TYPE_CHECKING without importing typing (mypy knows the name): every pgvault start
# passes through this module.
TYPE_CHECKING = False

__all__ = [
    "IMPL", "NATIVE_IMPORT_ERROR", "block_digests", "changed_blocks", "checksum_page", "index_build", "index_find",
    "index_merge", "verify_pages",
    "index_locate", "open_blocks", "refs_runs", "refs_sort", "writeback",  # the read path
    "entries_refs",  # verify
    "index_find_any",  # bounded index tables
    "block_ids", "seal_blocks",  # the write path
    "bucket_fill", "bucket_records", "disk_locate",  # the index on disk
]

ENV_VAR = "PGVAULT_IMPL"

# Why the native module could not be imported, when it was tried and failed (for diagnostics).
NATIVE_IMPORT_ERROR: str | None = None


def _select() -> object:
    global NATIVE_IMPORT_ERROR
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice not in ("", "native", "python"):
        raise ConfigError(f"{ENV_VAR}={choice!r} is not one of 'native', 'python' (or unset)")
    if choice == "python":
        from pgvault import _pure

        return _pure
    try:
        from pgvault import _native  # type: ignore[attr-defined]

        return _native
    except ImportError as exc:
        NATIVE_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        if choice == "native":
            raise ConfigError(
                f"{ENV_VAR}=native but the native module pgvault._native is unavailable "
                f"({NATIVE_IMPORT_ERROR}); rebuild/reinstall pgvault or unset {ENV_VAR}"
            ) from exc
    import logging  # only on this path: the logger of a pgvault that runs as built

    logging.getLogger("pgvault.accel").warning(
        "native module pgvault._native is unavailable (%s); using the much slower pure-Python "
        "fallback for page checksums and block digests",
        NATIVE_IMPORT_ERROR,
    )
    from pgvault import _pure

    return _pure


if TYPE_CHECKING:
    from pgvault._pure import (
        IMPL, block_digests, changed_blocks, checksum_page, index_build, index_find, index_merge, verify_pages,
    )
    from pgvault._pure import index_locate, open_blocks, refs_runs, refs_sort, writeback  # the read path
    from pgvault._pure import entries_refs  # verify
    from pgvault._pure import index_find_any  # bounded index tables
    from pgvault._pure import block_ids, seal_blocks  # the write path
    from pgvault._pure import bucket_fill, bucket_records, disk_locate  # the index on disk
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
    entries_refs = _impl.entries_refs  # verify
    index_find_any = _impl.index_find_any  # bounded index tables
    # the write path
    block_ids = _impl.block_ids
    seal_blocks = _impl.seal_blocks
    # the index on disk
    bucket_fill = _impl.bucket_fill
    bucket_records = _impl.bucket_records
    disk_locate = _impl.disk_locate
    del _impl
