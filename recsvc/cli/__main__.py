"""`python -m recsvc.cli`: what the `recsvc` console script runs (tests and the worker supervisor use it)."""

from __future__ import annotations

import sys

from recsvc.cli import main

sys.exit(main())
