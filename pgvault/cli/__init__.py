"""Command line: parse, resolve options, call ops, and map errors to exit codes in one place.

Every option may stand before or after the command, as with pgBackRest: the same option
set is attached to the top-level parser and to each command, with SUPPRESS defaults so an
option given in either place survives.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from pgvault import __version__
from pgvault.config import OPTIONS, resolve
from pgvault.errors import PgvaultError

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


def build_parser() -> argparse.ArgumentParser:
    from pgvault.cli.commands import COMMAND_HELP

    parser = _Parser(prog="pgvault", description="PostgreSQL backup and restore.")
    parser.add_argument("--version", action="version", version=f"pgvault {__version__}")
    _add_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_text, positionals) in COMMAND_HELP.items():
        cmd = sub.add_parser(name, help=help_text)
        _add_options(cmd)
        for positional in positionals:
            cmd.add_argument(positional)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pgvault.cli.commands import COMMAND_HELP, run

    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    command = ns.pop("command")
    positionals = tuple(ns.pop(p.replace("-", "_")) for p in COMMAND_HELP[command][1])
    cli_values = {key.replace("_", "-"): value for key, value in ns.items()}
    try:
        opts = resolve(command, positionals, cli_values, os.environ)
        _setup_logging(opts.log_level)
        return run(opts)
    except PgvaultError as exc:
        sys.stderr.write(f"pgvault: {command}: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"pgvault: {command}: interrupted\n")
        return 130


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level={"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}[level],
        format="pgvault: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
