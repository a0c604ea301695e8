"""The CLI is thin: every command group is one module, registered the same way, and no command got lost."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

import recsvc.cli
from recsvc.cli import GROUPS, _parser

COMMANDS = {
    "serving": {"up", "serve", "seed"},
    "training": {"train", "evaluate"},
    "models": {"publish", "render-config", "rollout", "rollback", "triton-sync", "build-index", "triton",
               "build-engine"},
    "catalog": {"update-catalog", "deny"},
    "client": {"recommend", "record"},
    "bench": {"bench", "cache-sim", "compress"},
}  # fmt: skip


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_group_module_is_listed_and_has_register_subparsers_common() -> None:
    modules = {p.stem for p in Path(recsvc.cli.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(GROUPS)
    for group in GROUPS:
        register = importlib.import_module(f"recsvc.cli.{group}").register
        assert list(inspect.signature(register).parameters) == ["sub", "common"], group


def test_each_group_adds_its_commands_and_together_they_are_all_of_recsvc() -> None:
    for group, expected in COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(f"recsvc.cli.{group}").register(sub, argparse.ArgumentParser(add_help=False))
        assert _commands(parser) == expected, group
    assert _commands(_parser()) == set().union(*COMMANDS.values())
