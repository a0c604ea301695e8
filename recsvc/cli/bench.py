"""Measurements: `recsvc bench` (end-to-end load), `recsvc cache-sim` (caches vs OPT), `recsvc compress`."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add bench, cache-sim and compress (their options live beside their code in recsvc/offline/bench/)."""
    from recsvc.offline.bench.cache_sim import register as register_cache_sim
    from recsvc.offline.bench.compression import register as register_compress
    from recsvc.offline.bench.e2e import register as register_bench

    register_bench(sub)
    register_cache_sim(sub)
    register_compress(sub)
