"""Offline measurements: `recsvc cache-sim` (cache policies vs OPT) and `recsvc compress` (ranker variants)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add cache-sim and compress (their options live beside their code in recsvc/offline/bench/)."""
    from recsvc.offline.bench.cache_sim import register as register_cache_sim
    from recsvc.offline.bench.compression import register as register_compress

    register_cache_sim(sub)
    register_compress(sub)
