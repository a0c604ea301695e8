"""The command-line options that choose a dataset, shared by train, evaluate, seed, up and compress."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_data_args", "load_dataset"]


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Add the options that choose a dataset (MovieLens, synthetic, or the user's files)."""
    p.add_argument("--dataset", choices=["movielens", "synthetic", "files"], default="movielens",
                   help="built-in MovieLens (default), the synthetic e-commerce generator, or your own files")
    p.add_argument("--interactions", type=Path,
                   help="--dataset files: CSV/Parquet with user_id,item_id,timestamp[,event_type]")
    p.add_argument("--items", type=Path, help="--dataset files: optional CSV/Parquet with item_id[,title,category]")
    p.add_argument("--synthetic-users", type=int, default=20_000)
    p.add_argument("--synthetic-items", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)  # fmt: skip


def load_dataset(args: argparse.Namespace) -> Any:
    """The dataset ``add_data_args``' options name."""
    from recsvc.offline.data import generate_synthetic, load_files, load_movielens

    if args.dataset == "movielens":
        return load_movielens()
    if args.dataset == "synthetic":
        return generate_synthetic(args.synthetic_users, args.synthetic_items, seed=args.seed)
    if args.interactions is None:
        raise SystemExit("--dataset files needs --interactions PATH")
    return load_files(args.interactions, args.items)
