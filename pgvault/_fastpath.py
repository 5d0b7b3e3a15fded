"""The console entry point, with a fast path for --archive-async.

PostgreSQL starts archive_command once per WAL segment and restore_command once per file.
In async mode the background worker has usually done the work already, and the answer is a
file in the spool: this module finds it using only os and sys, before the rest of pgvault
(argparse, the config, the repository) is imported. Anything it cannot settle for certain
(options in a config file, an option given as two words, no spool entry) goes the normal way.

A synchronous wal-push is settled by pgvault/_walpush.py, which imports only what storing
one segment in a filesystem repository needs.

Python's own start-up is most of what is left: ``python -S`` skips importing site (and the
.pth files of every installed package), which main() does only when the fast path misses.
"""

from __future__ import annotations

import os
import sys

_TRUE = ("1", "y", "yes", "true", "on")


def _settled(args: list[str]) -> int | None:
    """The exit code if this wal-push/wal-fetch call was answered from the spool, else None."""
    options: dict[str, str] = {}
    words: list[str] = []
    for arg in args:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and name != "archive-async":
                return None  # '--name value' needs the real parser
            options[name] = value if eq else "y"
        else:
            words.append(arg)
    if not words or words[0] not in ("wal-push", "wal-fetch"):
        return None
    command, positionals = words[0], words[1:]

    def option(name: str) -> str | None:
        return options.get(name) or os.environ.get("PGVAULT_" + name.upper().replace("-", "_"))

    if (option("archive-async") or "").lower() not in _TRUE:
        return None
    spool, stanza = option("spool-path"), option("stanza")
    if not spool or not stanza or "/" in stanza or stanza.startswith("."):
        return None
    if command == "wal-push" and len(positionals) == 1:
        from pgvault.ops.push_queue import push_fast

        try:
            timeout = float(option("archive-timeout") or 60)
        except ValueError:
            return None
        return push_fast(os.path.join(spool, stanza, "push"), os.path.basename(positionals[0]), timeout)
    if command == "wal-fetch" and len(positionals) == 2 and "/" not in positionals[0]:
        from pgvault.ops.fetch_queue import fetch_fast

        code = fetch_fast(os.path.join(spool, stanza, "fetch"), positionals[0], positionals[1])
        if code == 1:
            sys.stderr.write(f"pgvault: wal-fetch: WAL file {positionals[0]} is not in the repository\n")
        return code
    return None


def main() -> int:
    args = sys.argv[1:]
    try:
        code = _settled(args)
        if code is not None:
            return code
    except OSError:
        pass  # the normal path reports it properly
    if sys.flags.no_site:
        # Started as 'python -S' (restore_command is written that way): the site-packages
        # that the rest of pgvault needs are only set up now, when they are needed.
        import site

        site.main()
    if "wal-push" in args:
        from pgvault import _walpush

        try:
            if _walpush.push(args, os.environ):
                return 0
        except Exception:  # nothing was stored: the full path runs from the start and reports
            pass
    from pgvault.cli import main as full_main

    return full_main(args)


# What the console script does, as a -c program: `python -S -c ENTRY ARGS...` starts in about
# half the time of `python -S -m pgvault`, whose runpy import (importlib.util, contextlib,
# collections, functools) costs 5 ms of a 10 ms start, once per WAL file (measured with
# -X importtime). For commands pgvault writes for PostgreSQL to run, see self_command().
ENTRY = "import sys; from pgvault._fastpath import main; sys.exit(main())"


def self_command(python: str, package_root: str) -> str:
    """A shell command that runs this very pgvault without site and without runpy: what
    restore_command (ops/restore.py) should start with. PYTHONPATH pins this copy of pgvault,
    since PostgreSQL runs the command from the data directory."""
    from shlex import quote

    return f"PYTHONPATH={quote(package_root)} {quote(python)} -S -c {quote(ENTRY)}"
