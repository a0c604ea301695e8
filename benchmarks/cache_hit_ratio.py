"""Hit ratio per policy and cache size: ``recsvc cache-sim`` without going through the ``recsvc`` CLI.

    python benchmarks/cache_hit_ratio.py [cache-sim options: --alpha --users --accesses --sizes
                                          --trace --seed --png --policies]

The defaults (Zipf alpha 1.2 over 100,000 users, 2,000,000 accesses, sizes 1%..40% of the users) are
the figures in docs/PERFORMANCE.md; it takes about two minutes on two cores.
"""

from __future__ import annotations

import argparse
import sys

from recsvc.offline.bench.cache_sim import register


def main() -> int:
    """Parse ``cache-sim`` options and run it."""
    parser = argparse.ArgumentParser(prog="cache_hit_ratio.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["cache-sim", *sys.argv[1:]])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
