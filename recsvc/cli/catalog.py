"""The catalog: add cold-start items and retire items (a new bundle), and the deny list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsvc.cli._common import Parser, options, settings_of
from recsvc.errors import ConfigError

__all__ = ["register"]


def cmd_update_catalog(args: argparse.Namespace) -> int:
    """Add cold-start items (content-based embeddings from their category) and retire items, as a new bundle."""
    from recsvc.offline.catalog_update import update_catalog
    from recsvc.offline.data import read_catalog

    # New items are read and checked as a training catalog is (ids in the API's grammar, UTF-8, unique).
    add = read_catalog(args.add, max_id_len=settings_of(args).max_id_len) if args.add else None
    result = update_catalog(args.bundle, args.out, add=add, retire=args.retire)
    print(f"{args.out}: {result.added} items added, {result.reactivated} re-activated, {result.retired} retired; "
          f"{result.num_items:,} items ({result.model_items:,} known to the models). Publish it with "
          f"`recsvc publish {args.out}`")  # fmt: skip
    return 0


def cmd_deny(args: argparse.Namespace) -> int:
    """Show or change the deny list (SKUs never recommended); running servers pick it up within a second."""
    from recsvc.deny import read_deny_list, update_deny_list

    if args.data_dir is None:
        args.data_dir = args.deny_data_dir
    settings = settings_of(args)
    path = settings.resolved_deny_list()
    skus_given = getattr(args, "skus", [])
    if args.action != "add" and not path.parent.is_dir():
        # Only add creates it: a list of a folder that is not there would read as an empty deny list.
        raise ConfigError(f"no folder {path.parent} (--data-dir or RECSVC_DATA_DIR misspelt?); nothing is denied "
                          "there yet")  # fmt: skip
    if args.action == "list":
        skus = read_deny_list(path)
    else:
        before = read_deny_list(path)
        skus = update_deny_list(path, add=skus_given if args.action == "add" else (),
                                remove=skus_given if args.action == "remove" else (), clear=args.action == "clear",
                                max_id_len=settings.max_id_len)  # fmt: skip
        if args.action == "remove":
            for sku in (s for s in skus_given if s not in before):
                print(f"{sku!r} was not on the deny list", file=sys.stderr)
    for sku in sorted(skus):
        print(sku)
    print(f"{len(skus)} SKUs denied ({path})", file=sys.stderr)
    return 0



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add update-catalog and deny."""
    p = sub.add_parser("update-catalog", parents=[common], help=cmd_update_catalog.__doc__,
                       description=cmd_update_catalog.__doc__)
    p.add_argument("bundle", type=Path, help="the bundle to start from (e.g. model_repository/ranker/3/bundle)")
    p.add_argument("--out", type=Path, required=True, help="directory of the new bundle")
    p.add_argument("--add", type=Path, help="CSV/Parquet of new items: item_id[,title,category]")
    p.add_argument("--retire", nargs="*", default=[], help="SKUs never to retrieve again")
    p.set_defaults(func=cmd_update_catalog)

    p = sub.add_parser("deny", help=cmd_deny.__doc__, description=cmd_deny.__doc__)
    # Also before the action (`deny --data-dir D add SKU`): its own dest, as the action's parser would
    # otherwise reset data_dir to its default.
    p.add_argument("--data-dir", dest="deny_data_dir", type=Path, help="default var/ (RECSVC_DATA_DIR)")
    actions: argparse._SubParsersAction[argparse.ArgumentParser] = p.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Intermixed)
    for action, text in (("list", "print the denied SKUs"), ("add", "deny these SKUs"),
                         ("remove", "stop denying these SKUs"), ("clear", "deny nothing")):  # fmt: skip
        q = actions.add_parser(action, parents=[common, options("data_dir")], help=text, description=text)
        if action in ("add", "remove"):
            # One or more, before or after the options; a SKU that starts with "-" goes after "--".
            q.add_argument("skus", nargs="+", metavar="SKU", help="SKU as the API takes it (spaces and # allowed)")
    p.set_defaults(func=cmd_deny)


class _Intermixed(Parser):
    """A leaf command's parser taking options and positionals in any order (`add A --data-dir D B`)."""

    _parsing = False

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # parse_known_intermixed_args calls parse_known_args itself: the plain one, from inside. After "--"
        # (SKUs that start with "-") the order is explicit already, and intermixed parsing mishandles it.
        if self._parsing or (args is not None and "--" in args):
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False
