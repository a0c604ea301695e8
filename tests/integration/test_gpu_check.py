"""The prepared GPU check's end-to-end section, run on this CPU host as a lent GPU host would run it.

benchmarks/gpu/gpu_bench.py builds a stack (make_1m_stack.py, smaller here), then `recsvc bench --start`
runs Triton, recsvc and the load generator; the section reads the bench's report into gpu.json and gpu.md.
On a GPU host the same code only switches retrieval to the torch CUDA search.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.processes import stack_env
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_checks_end_to_end_section_serves_real_recommends(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port())      # free Triton ports; the section picks its own stack folders
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu/gpu_bench.py", "--out", str(out), "--only", "end_to_end",
         "--e2e-items", "3000", "--e2e-users", "300", "--e2e-seconds", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    e2e = json.loads((out / "gpu.json").read_text())["end_to_end"]
    assert "error" not in e2e and "skipped" not in e2e, e2e
    assert (e2e["items"], e2e["candidates"], e2e["retrieval"]) == (3000, 500, "faiss on the CPU")
    levels = {lv["concurrency"]: lv for lv in e2e["levels"]}
    assert set(levels) == {16, 64, 256}
    assert levels[16]["recommend_per_s"] > 0 and levels[16]["failed"] == 0 and levels[16]["degraded"] == 0
    assert all(stage is not None for stage in levels[16]["stages_ms"].values())       # every stage ran
    assert "| 16 |" in (out / "gpu.md").read_text()
