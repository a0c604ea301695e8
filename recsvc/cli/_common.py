"""What every command module shares: settings from the common options, and the printing of answers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from recsvc.config import Settings, load_settings

__all__ = ["DEMO_USER", "Parser", "options", "print_recommendation", "settings_of", "version_catalog"]

# Demo user for MovieLens: ~200 ratings, mostly sci-fi and action, so the answer is visibly personal.
DEMO_USER = "41"


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (what is wrong, and where help is), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line to stderr and exit 2."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "data_dir": (("--data-dir",), {"type": Path, "help": "history store, deny list, bundles and logs (default var/; "
                                                         "RECSVC_DATA_DIR)"}),
    "model_repository": (("--model-repository",), {
        "type": Path, "help": "published model versions (default model_repository/; RECSVC_MODEL_REPOSITORY)"}),
    "triton_url": (("--triton-url",), {
        "help": "Triton's gRPC host:port (default 127.0.0.1:8001; RECSVC_TRITON_URL)"}),
}  # fmt: skip


def options(*names: str) -> argparse.ArgumentParser:
    """A parent parser with just the shared options (``data_dir``, ``model_repository``, ``triton_url``) named.

    Each command takes only those it uses, so its --help lists nothing it would ignore.
    """
    parent = argparse.ArgumentParser(add_help=False)
    for name in names:
        flags, kwargs = _OPTIONS[name]
        parent.add_argument(*flags, **kwargs)
    return parent


def settings_of(args: argparse.Namespace) -> Settings:
    """Settings: defaults < RECSVC_* environment < the command's options."""
    return load_settings(
        port=getattr(args, "port", None),
        model_repository=getattr(args, "model_repository", None),
        data_dir=getattr(args, "data_dir", None),
        triton_url=getattr(args, "triton_url", None),
        rollout_drain_s=getattr(args, "drain_s", None),
    )


def print_recommendation(rec: Any, catalog: Any, user: str) -> None:
    """Print an answer, with titles from ``catalog`` when there is one."""
    print(f"\nRecommend(user_id={user!r}) -> model version {rec.model_version}, index {rec.index_version}"
          + (f", DEGRADED: {rec.degraded_reason}" if rec.degraded else ""))  # fmt: skip
    for rank, item in enumerate(rec.items, 1):
        title = catalog.title(item.item_id) if catalog is not None else ""
        print(f"  {rank:2d}. {item.item_id:>10}  {item.score:8.3f}  {title}")


def version_catalog(settings: Settings, version: str) -> Any:
    """The catalog of the model version that answered, from the local model repository; None if it is not there.

    That version's, not the newest one's: after a publish or a catalog update the two differ. Missing (run
    away from the checkout, or against a remote server) says so on stderr, so blank titles do not look
    like items without one.
    """
    from recsvc.catalog import Catalog
    from recsvc.repository import latest_version

    if not version:                              # an answer that names no version: the newest published one
        newest = latest_version(settings.model_repository, settings.triton_model)
        if newest is None:
            return None
        version = str(newest)
    path = settings.model_repository / settings.triton_model / str(version) / "bundle" / "items.parquet"
    if not path.is_file():
        print(f"(no titles: model version {version} is not in {settings.model_repository}; --model-repository "
              "or RECSVC_MODEL_REPOSITORY names the server's)", file=sys.stderr)  # fmt: skip
        return None
    return Catalog.read(path)
