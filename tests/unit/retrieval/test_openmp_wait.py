"""faiss's OpenMP threads sleep between searches unless the operator says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys


def _policy(env: dict[str, str]) -> str:
    code = "import os, recsvc.retrieval, faiss; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def test_passive_by_default_and_an_operator_setting_wins() -> None:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(base) == "PASSIVE"
    assert _policy({**base, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_the_setting_is_in_place_before_faiss_is_imported() -> None:
    # faiss (libgomp) reads the variable when it loads: the package must set it before its first import.
    import recsvc.retrieval

    source = open(recsvc.retrieval.__file__).read()
    assert source.index("OMP_WAIT_POLICY") < source.index("from recsvc.retrieval.backends import")
