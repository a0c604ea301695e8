"""Row "Triton frozen (SIGSTOP 5 s)": every request is answered within its own deadline, degraded ones flagged.

The rank stage gets a share of each request's remaining deadline (``rank_budget_share``); a request whose
share runs out while Triton is frozen (a batch stuck in flight, others queued behind it) is answered in
retrieval order, flagged degraded. Triton's python backend sometimes aborts after SIGCONT (a fault of the
backend, restarting it is another row's business): the test only needs every request answered, so a
Triton that does not come back just means more "ranker unavailable" answers after the freeze.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from recsvc.offline.data import Dataset
from recsvc.pipeline import DEGRADED_REASONS
from tests.faults.harness import LoadGen, descendants, fault_stack, record, signal_all
from tests.faults.test_store_outage import degraded_counts
from tests.support import free_port

CLIENTS = 16
DEADLINE_S = 1.0
FREEZE_S = 5.0


def tritonserver_pids(launcher: int) -> list[int]:
    """tritonserver and its backend stubs (not the `recsvc triton` launcher that supervises them)."""
    pids = descendants(launcher)
    assert pids, "recsvc triton has no tritonserver child"
    return pids


async def test_frozen_triton_every_request_answered_within_its_own_deadline(
    tmp_path: Path, fault_data: tuple[Path, Dataset]
) -> None:
    metrics_port = free_port()
    async with fault_stack(tmp_path, *fault_data, RECSVC_METRICS_PORT=str(metrics_port)) as stack:
        gen = LoadGen(stack.target, stack.users, clients=CLIENTS, deadline_s=DEADLINE_S, retry=False)
        before = await gen.run(1.5)                      # steady state first: ranked answers
        assert before.failed_total == 0, before.failed
        frozen = tritonserver_pids(stack.triton.popen.pid)
        async with gen.background(max_s=30) as tally:
            await asyncio.sleep(0.5)
            signal_all(frozen, signal.SIGSTOP)
            try:
                await asyncio.sleep(FREEZE_S)
                during = tally.ok + tally.failed_total
            finally:
                signal_all(frozen, signal.SIGCONT)
            await asyncio.sleep(1.5)
        counts = degraded_counts(metrics_port)
        record("Triton frozen (SIGSTOP 5 s)", "test_triton_frozen",
               "every request answered within its own budget: the rank stage gets a share of the request's "
               "remaining deadline; past it the answer is in retrieval order, flagged degraded", tally,
               clients=CLIENTS, client_deadline_s=DEADLINE_S, freeze_s=FREEZE_S,
               answered_while_frozen=during, steady_before=before.as_dict(),
               server_degraded_counters=counts)  # fmt: skip
        assert tally.sent > CLIENTS * 3
        # Nothing failed: not DEADLINE_EXCEEDED (the client's own deadline), not UNAVAILABLE, not anything.
        assert tally.failed_total == 0, (tally.failed, stack.server.tail())
        assert tally.ok == tally.sent
        # Requests kept being answered while Triton was frozen (not one stuck wait per client), degraded.
        assert during > CLIENTS * 2, during
        assert tally.degraded > 0
        allowed = {DEGRADED_REASONS["ranker_timeout"], DEGRADED_REASONS["ranker_unavailable"]}
        assert set(tally.degraded_reasons) <= allowed, tally.degraded_reasons
        # ... and counted by the server under their kinds (at least what the client saw).
        assert counts["ranker_timeout"] + counts["ranker_unavailable"] >= tally.degraded, counts
        # Answered within the client's deadline (a later answer would have been DEADLINE_EXCEEDED above).
        assert max(tally.latencies_s) < DEADLINE_S
        assert stack.tracebacks() == 0
