"""The reference row: steady load with nothing broken. Every other row is read against it."""

from __future__ import annotations

from pathlib import Path

from recsvc.offline.data import Dataset
from tests.faults.harness import LoadGen, fault_stack, health_status, record


async def test_steady_load_has_no_failures(tmp_path: Path, fault_data: tuple[Path, Dataset]) -> None:
    async with fault_stack(tmp_path, *fault_data) as stack:
        assert await health_status(stack.target) == "SERVING"
        tally = await LoadGen(stack.target, stack.users, clients=16).run(4.0)
        record("no fault (steady load, 16 closed-loop clients)", "test_baseline",
               "every request answered, ranked (not degraded)", tally)  # fmt: skip
        assert tally.sent > 50
        assert tally.failed_total == 0, tally.failed
        assert tally.degraded == 0, tally.degraded_reasons
        assert stack.tracebacks() == 0
