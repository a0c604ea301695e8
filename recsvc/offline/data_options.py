"""The command-line options that choose a dataset, shared by train, evaluate, seed, up and compress.

Giving data files implies ``--dataset files``: ``--interactions F`` alone means the user's own data, and
naming a built-in dataset beside files is an error rather than a silent choice of one of them.
A trained bundle records where its data came from (``data_source``), so ``recsvc evaluate BUNDLE`` can
load the same data again without being told.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from recsvc.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "DATASETS", "add_data_args", "add_split_args", "bundle_dataset", "data_given", "data_source", "describe_split",
    "fraction", "load_dataset", "load_source", "positive_int", "split_protocol",
]  # fmt: skip

DATASETS = ("movielens", "synthetic", "files")


def add_data_args(p: argparse.ArgumentParser, *, default: str | None = "movielens") -> None:
    """Add the options that choose a dataset (MovieLens, synthetic, or the user's files).

    ``default`` is the dataset when no option names one (None: the command decides, e.g. evaluate uses
    the bundle's own data).
    """
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="built-in MovieLens" + (" (default)" if default == "movielens" else "")
                        + ", the synthetic e-commerce generator, or your own files (implied by --interactions)")
    p.add_argument("--interactions", type=Path,
                   help="your interactions: CSV/Parquet with user_id,item_id,timestamp[,event_type]")
    p.add_argument("--items", type=Path, help="your catalog (optional, with --interactions): CSV/Parquet with "
                                              "item_id[,title,category]")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep rows repeating an earlier row's user, item, timestamp and event type (default: "
                        "counted and dropped)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip interaction rows with an empty or invalid id, a bad timestamp or event type "
                        "(counted, the first few named) instead of stopping at the first")
    p.add_argument("--synthetic-users", type=int, default=20_000, help="--dataset synthetic: users (default 20000)")
    p.add_argument("--synthetic-items", type=int, default=10_000, help="--dataset synthetic: items (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator and of training (default 0)")
    p.set_defaults(default_dataset=default)  # fmt: skip


def data_given(args: argparse.Namespace) -> bool:
    """True when the command line names a dataset (or files) at all."""
    return args.dataset is not None or args.interactions is not None or args.items is not None


def data_source(args: argparse.Namespace) -> dict[str, Any]:
    """What ``args`` name as the data, as a JSON-able dict (recorded in the bundle's manifest)."""
    dataset = args.dataset
    files = args.interactions is not None or args.items is not None
    if files and dataset not in (None, "files"):
        raise ConfigError(f"--interactions/--items are your own data: drop --dataset {dataset} (files imply "
                          "--dataset files)")  # fmt: skip
    if dataset is None:
        dataset = "files" if files else getattr(args, "default_dataset", None) or "movielens"
    if dataset == "files":
        if args.interactions is None:
            raise ConfigError("your own data needs --interactions FILE (and optionally --items FILE)")
        return {"dataset": "files", "interactions": str(Path(args.interactions).resolve()),
                "items": str(Path(args.items).resolve()) if args.items is not None else None,
                "keep_duplicates": bool(args.keep_duplicates), "skip_bad_rows": bool(args.skip_bad_rows)}  # fmt: skip
    if dataset == "synthetic":
        return {"dataset": "synthetic", "users": args.synthetic_users, "items": args.synthetic_items,
                "seed": args.seed}  # fmt: skip
    return {"dataset": "movielens"}


def load_dataset(args: argparse.Namespace) -> Any:
    """The dataset ``add_data_args``' options name."""
    return load_source(data_source(args))


def load_source(source: dict[str, Any]) -> Any:
    """The dataset a ``data_source`` dict describes."""
    from recsvc.config import load_settings
    from recsvc.offline.data import generate_synthetic, load_files, load_movielens

    if source["dataset"] == "movielens":
        return load_movielens()
    if source["dataset"] == "synthetic":
        return generate_synthetic(int(source["users"]), int(source["items"]), seed=int(source["seed"]))
    items = Path(source["items"]) if source.get("items") else None
    # Duplicates and skipped rows are logged (stderr) by load_files.
    # Ids follow the API's grammar, with its length bound (RECSVC_MAX_ID_LEN), so every one can be asked for.
    return load_files(Path(source["interactions"]), items, keep_duplicates=bool(source.get("keep_duplicates")),
                      skip_bad_rows=bool(source.get("skip_bad_rows")),
                      max_id_len=load_settings().max_id_len)  # fmt: skip


def trained_bundle(bundle: Path) -> Any:
    """The manifest of a bundle ``recsvc train`` wrote, every file checked against it (as publish does).

    A damaged bundle would otherwise be evaluated as it is (a flipped byte in the embeddings changes
    the figures, exit 0) or fail inside ONNX Runtime. A catalog update (``update-catalog``) is refused:
    it keeps its parent's models, and the data has no interactions with the items it adds.
    """
    from recsvc.bundle import verify_bundle

    manifest = verify_bundle(bundle)
    update = manifest.extra.get("catalog_update")
    if update:
        raise ConfigError(f"{bundle} is a catalog update (recsvc update-catalog) of the bundle whose manifest "
                          f"checksum starts {update.get('parent')}: it has that bundle's models, and the data holds "
                          "no interaction with the items it adds; use the bundle it was made from")  # fmt: skip
    return manifest


def bundle_dataset(args: argparse.Namespace, bundle: Path) -> Any:
    """The data ``bundle`` was trained on: what ``args`` name, else what its manifest records.

    A ConfigError says what to pass when the bundle does not record its data (or its files are gone),
    and when the data does not have the bundle's items (another dataset: evaluating on it would be
    meaningless, or fail inside ONNX Runtime).
    """
    from recsvc.bundle import read_manifest

    manifest = read_manifest(bundle)
    source = manifest.extra.get("data_source")
    if data_given(args):
        source = data_source(args)
    elif source is None:
        if manifest.dataset != "movielens":
            raise ConfigError(f"{bundle} was trained on {manifest.dataset!r} and does not record where that data "
                              "is: pass it (--interactions FILE [--items FILE], or --dataset synthetic with its "
                              "--synthetic-* options)")  # fmt: skip
        source = {"dataset": "movielens"}
    elif source["dataset"] == "files":
        missing = [source[k] for k in ("interactions", "items") if source.get(k) and not Path(source[k]).is_file()]
        if missing:
            raise ConfigError(f"{bundle} was trained on {', '.join(missing)}, which no longer exist: pass the "
                              "data with --interactions FILE [--items FILE]")  # fmt: skip
    ds = load_source(source)
    model_items = int(manifest.extra.get("model_items", manifest.num_items))
    if ds.num_items != model_items:
        raise ConfigError(f"{bundle} was trained on {model_items:,} items; this data ({ds.name}) has "
                          f"{ds.num_items:,}: evaluate a bundle on the data it was trained on")  # fmt: skip
    return ds


def split_protocol(args: argparse.Namespace, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """time_split's arguments: the command line's, else the bundle's recorded ones, else the last 5 per user."""
    if args.test_fraction is not None:
        return {"test_fraction": args.test_fraction}
    if args.test_per_user is not None:
        return {"test_per_user": args.test_per_user}
    return dict(recorded) if recorded else {"test_per_user": 5}


def describe_split(protocol: dict[str, Any]) -> str:
    """How the held-out set was chosen, for people."""
    if "test_fraction" in protocol:
        return f"latest {protocol['test_fraction']:.0%} of each user's interactions"
    return f"last {protocol['test_per_user']} interactions per user"


def fraction(text: str) -> float:
    """Argparse type: a float strictly between 0 and 1."""
    return _parsed(text, float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (e.g. 0.2)")


def add_split_args(p: argparse.ArgumentParser, *, default_note: str) -> None:
    """--test-per-user N | --test-fraction F: the two hold-out protocols (recsvc.offline.data.time_split)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--test-per-user", type=positive_int, metavar="N",
                       help=f"hold out each user's latest N interactions ({default_note})")  # fmt: skip
    group.add_argument("--test-fraction", type=fraction, metavar="F",
                       help="hold out each user's latest fraction F of their interactions instead (e.g. 0.2)")


def positive_int(text: str) -> int:
    """Parse an argparse value: an integer >= 1 (a bad value is argparse's one-line usage error, exit status 2)."""
    return _parsed(text, int, lambda v: v >= 1, "a positive integer")


def _parsed(text: str, convert: Callable[[str], T], valid: Callable[[T], bool], expected: str) -> T:
    bad = argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    try:
        value = convert(text)
    except ValueError:
        raise bad from None
    if not valid(value):
        raise bad
    return value
