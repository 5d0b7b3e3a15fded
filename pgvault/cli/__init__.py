"""Command line: parse, resolve options, call ops, and map errors to exit codes in one place.

Every option may stand before or after the command, as with pgBackRest: the same option
set is attached to the top-level parser and to each command, with SUPPRESS defaults so an
option given in either place survives.
"""

from __future__ import annotations

import argparse
import os
import sys

from pgvault import __version__
from pgvault.config import OPTIONS, resolve
from pgvault.errors import PgvaultError, WalNotFoundError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Sequence

# restore_command contract: PostgreSQL takes exit status 1 (any status up to 125) as "no
# such file" and ends recovery there; above 125 it stops recovery instead. So wal-fetch
# exits 1 only when the file is absent from the archive, and adds this to every other code:
# an unreadable repository must never end recovery early and promote at the wrong point.
RECOVERY_FATAL = 128

def _add_options(parser: argparse.ArgumentParser) -> None:
    for spec in OPTIONS:
        flag = f"--{spec.name}"
        if spec.flag:
            parser.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS, help=spec.help)
        elif spec.multi:
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, metavar=spec.metavar, help=spec.help)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=spec.metavar, help=spec.help)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 3 like other config errors
        sys.stderr.write(f"pgvault: error: {message}\n")
        raise SystemExit(3)


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, asking the terminal for its width only when help is printed:
    argparse makes a formatter for every add_argument (to check metavars), and the default one
    imports shutil for the width, which cost every pgvault start ~3 ms."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or 80)
        self._width_unknown = width is None
        self._help_position = max_help_position

    def format_help(self) -> str:
        if self._width_unknown:  # what HelpFormatter.__init__ does with width=None
            import shutil

            self._width = shutil.get_terminal_size().columns - 2
            self._max_help_position = min(self._help_position, max(self._width - 20, self._indent_increment * 2))
        return super().format_help()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with only=COMMAND just that command's subparser is built, which is what
    a run needs (wal-push runs once per WAL segment: each millisecond counts)."""
    from pgvault.cli.commands import COMMAND_HELP

    parser = _Parser(prog="pgvault", description="PostgreSQL backup and restore.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pgvault {__version__}")
    _add_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_text, positionals) in COMMAND_HELP.items():
        if only is not None and name != only:
            continue
        cmd = sub.add_parser(name, help=help_text, formatter_class=_Formatter)
        _add_options(cmd)
        for positional in positionals:
            cmd.add_argument(positional)
    return parser


def _command_parser(command: str) -> argparse.ArgumentParser:
    """One parser for a run of command: every option and the command's positionals, for the
    arguments without the command word. It accepts what build_parser(command) accepts, with
    half of argparse's set-up (one parser, not a top-level one and a subparser)."""
    from pgvault.cli.commands import COMMAND_HELP

    parser = _Parser(prog=f"pgvault {command}", formatter_class=_Formatter)
    _add_options(parser)
    for positional in COMMAND_HELP[command][1]:
        parser.add_argument(positional)
    return parser


def _command_in(args: list[str]) -> str | None:
    """The command word, if args name exactly one (options never take a command's name)."""
    from pgvault.cli.commands import COMMAND_HELP

    found = [a for a in args if a in COMMAND_HELP]
    return found[0] if len(found) == 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    fetching = "wal-fetch" in args  # decided before parsing: usage errors count too
    try:
        return _main(args)
    except SystemExit as exc:  # argparse: --help, --version, or a usage error (exit 3)
        code = exc.code if isinstance(exc.code, int) else 2
        return code + RECOVERY_FATAL if fetching and code not in (0, 1) else code
    except PgvaultError as exc:
        sys.stderr.write(f"pgvault: {exc.message}\n")
        return _exit_code(fetching, exc.exit_code, exc)
    except KeyboardInterrupt:
        sys.stderr.write("pgvault: interrupted\n")
        return 130
    except Exception as exc:  # a bug: still one line and a code that cannot mean "absent"
        sys.stderr.write(f"pgvault: internal error: {type(exc).__name__}: {exc}\n")
        if os.environ.get("PGVAULT_DEBUG"):
            raise
        return _exit_code(fetching, 2, exc)


def _exit_code(fetching: bool, code: int, exc: BaseException) -> int:
    if not fetching or isinstance(exc, WalNotFoundError):
        return code
    return code + RECOVERY_FATAL if code != 0 else code


def _main(args: list[str]) -> int:
    from pgvault.cli.commands import COMMAND_HELP, run

    command = _command_in(args) if "-h" not in args and "--help" not in args and "--version" not in args else None
    if command is not None:
        rest = list(args)
        rest.remove(command)
        ns = vars(_command_parser(command).parse_args(rest))
    else:  # help, --version, no or an ambiguous command: the whole parser says what is wrong
        ns = vars(build_parser().parse_args(args))
        command = ns.pop("command")
    positionals = tuple(ns.pop(p.replace("-", "_")) for p in COMMAND_HELP[command][1])
    cli_values = {key.replace("_", "-"): value for key, value in ns.items()}
    try:
        opts = resolve(command, positionals, cli_values, os.environ)
        _setup_logging(opts.log_level)
        return run(opts)
    except PgvaultError as exc:
        exc.message = f"{command}: {exc.message}"
        raise


def _setup_logging(level: str) -> None:
    import logging  # here, not at the top: `pgvault --help` and usage errors do without it

    logging.basicConfig(
        level={"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}[level],
        format="pgvault: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
