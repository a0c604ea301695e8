from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from recsvc.coalesce import Answer, Coalescer
from recsvc.errors import RankerUnavailable, Unavailable

# Every wait on a caller below is bounded: without the fixes these calls never return, and a bound turns
# that hang into a failure (TimeoutError) instead of a stuck suite.
BOUND_S = 5.0


async def test_items_of_one_key_share_a_batch_and_keys_never_mix() -> None:
    batches: list[list[tuple[str, int]]] = []

    async def handle(items: Sequence[tuple[str, int]], _: Answer[int]) -> list[int]:
        batches.append(list(items))
        return [n * 10 for _, n in items]

    c: Coalescer[tuple[str, int], int] = Coalescer(handle, max_rows=100, max_wait_us=20_000, key=lambda i: i[0])
    calls = [("a", 1), ("a", 2), ("b", 3), ("a", 4)]
    results = await asyncio.gather(*(c.submit(i) for i in calls))
    assert results == [10, 20, 30, 40]
    assert all(len({k for k, _ in b}) == 1 for b in batches)       # one key per batch
    assert sum(len(b) for b in batches) == 4 and len(batches) < 4
    await c.close()


async def test_an_item_that_would_overflow_opens_the_next_batch() -> None:
    sizes: list[int] = []

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        sizes.append(sum(items))
        return list(items)

    c: Coalescer[int, int] = Coalescer(handle, max_rows=5, max_wait_us=20_000, rows=lambda n: n)
    assert await asyncio.gather(c.submit(3), c.submit(3), c.submit(2)) == [3, 3, 2]
    assert max(sizes) <= 5 and sum(sizes) == 8
    await c.close()


async def test_failure_reaches_exactly_its_batch_and_cancelled_callers_are_skipped() -> None:
    seen: list[list[int]] = []

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        seen.append(list(items))
        if 13 in items:
            raise RuntimeError("unlucky batch")
        return list(items)

    c: Coalescer[int, int] = Coalescer(handle, max_rows=1, max_wait_us=0)
    with pytest.raises(RuntimeError, match="unlucky"):
        await c.submit(13)
    assert await c.submit(7) == 7
    await c.close()
    with pytest.raises(Unavailable, match="closed"):
        await c.submit(1)


async def test_sub_millisecond_waits_never_arm_a_timer(coalescer_timers: list[float]) -> None:
    # asyncio's selector rounds a timer up to 1 ms: a 200 us budget must be spent yielding, not sleeping.
    timers = coalescer_timers

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        return list(items)

    short: Coalescer[int, int] = Coalescer(handle, max_rows=64, max_wait_us=200)
    assert [await short.submit(i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert timers == []
    long: Coalescer[int, int] = Coalescer(handle, max_rows=64, max_wait_us=5000)
    assert await long.submit(7) == 7
    assert timers and 0 < timers[0] <= 0.005              # a real wait still uses a timer
    await short.close()
    await long.close()


async def test_more_than_one_batch_in_flight_when_allowed() -> None:
    running = 0
    peak = 0
    release = asyncio.Event()

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return list(items)

    c: Coalescer[int, int] = Coalescer(handle, max_rows=1, max_wait_us=0, max_in_flight=2)
    calls = [asyncio.create_task(c.submit(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert peak == 2                           # two batches computing, the rest queued
    release.set()
    assert await asyncio.gather(*calls) == [0, 1, 2, 3]
    await c.close()


async def test_close_fails_callers_of_a_batch_in_flight_held_and_queued() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        started.set()
        await release.wait()            # a backend that never answers (a frozen Triton)
        return list(items)

    c: Coalescer[int, int] = Coalescer(handle, max_rows=8, max_wait_us=0, key=lambda i: i % 2)
    # 0 and 2 form the stuck batch; 1 (another key) is held for the next one, 3 and 4 stay queued.
    calls = [asyncio.create_task(c.submit(i)) for i in (0, 2, 1, 3, 4)]
    await asyncio.wait_for(started.wait(), BOUND_S)
    await asyncio.wait_for(c.close(), BOUND_S)
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND_S)
    assert all(isinstance(r, Unavailable) and "closed" in str(r) for r in results), results


async def test_close_fails_callers_of_a_batch_still_forming() -> None:
    handled: list[list[int]] = []

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        handled.append(list(items))
        return list(items)

    # A long max_wait: the runner has taken the items and waits for more company when close() comes.
    c: Coalescer[int, int] = Coalescer(handle, max_rows=8, max_wait_us=10_000_000)
    calls = [asyncio.create_task(c.submit(i)) for i in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.wait_for(c.close(), BOUND_S)
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND_S)
    assert handled == []
    assert all(isinstance(r, Unavailable) for r in results), results


async def test_a_cancelled_batch_fails_its_callers_and_the_queue_keeps_serving() -> None:
    started = asyncio.Event()
    stuck = True

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        if stuck:
            started.set()
            await asyncio.sleep(3600)
        return [i * 2 for i in items]

    c: Coalescer[int, int] = Coalescer(handle, max_rows=8, max_wait_us=0)
    calls = [asyncio.create_task(c.submit(i)) for i in range(2)]
    await asyncio.wait_for(started.wait(), BOUND_S)
    [batch] = c._in_flight
    batch.cancel()                      # e.g. a task group or the loop tearing it down
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND_S)
    assert all(isinstance(r, Unavailable) and "cancelled" in str(r) for r in results), results
    stuck = False
    assert await asyncio.wait_for(c.submit(5), BOUND_S) == 10    # its slot was given back
    await c.close()


async def test_a_cancelled_runner_fails_what_it_holds_and_the_next_submit_restarts_it() -> None:
    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        return list(items)

    c: Coalescer[int, int] = Coalescer(handle, max_rows=8, max_wait_us=10_000_000)
    calls = [asyncio.create_task(c.submit(i)) for i in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert c._runner is not None
    c._runner.cancel()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND_S)
    assert all(isinstance(r, Unavailable) for r in results), results
    fast: Coalescer[int, int] = c
    fast._max_wait_s = 0.0
    assert await asyncio.wait_for(fast.submit(7), BOUND_S) == 7
    await c.close()


async def test_a_caller_gives_up_alone_and_the_shared_batch_still_answers_the_others() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls_seen: list[list[int]] = []

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        calls_seen.append(list(items))
        started.set()
        await release.wait()
        return [i + 100 for i in items]

    c: Coalescer[int, int] = Coalescer(handle, max_rows=8, max_wait_us=0)
    patient = asyncio.create_task(c.submit(1))
    await asyncio.wait_for(started.wait(), BOUND_S)
    queued_patient = asyncio.create_task(c.submit(2))          # queued behind the stuck batch
    # Callers with short deadlines, one in the stuck batch's queue: each gives up at its own bound.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.submit(3), 0.05)
    assert not patient.done() and not queued_patient.done()   # the batch was not cancelled for them
    release.set()
    assert await asyncio.wait_for(patient, BOUND_S) == 101
    assert await asyncio.wait_for(queued_patient, BOUND_S) == 102
    assert [3] not in calls_seen and all(3 not in batch for batch in calls_seen)   # the quitter was skipped
    await c.close()


async def test_a_result_count_mismatch_fails_the_batch_with_the_owners_error() -> None:
    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        return [*items, 0]                       # one row too many: the backend answered wrongly

    c: Coalescer[int, int] = Coalescer(handle, max_rows=1, max_wait_us=0, name="ranking queue",
                                       closed_error=RankerUnavailable)  # fmt: skip
    # RankerUnavailable (the pipeline answers degraded), not RuntimeError (INTERNAL for the client).
    with pytest.raises(RankerUnavailable, match="ranking queue answered 2 results for a batch of 1"):
        await asyncio.wait_for(c.submit(1), BOUND_S)
    await c.close()


async def test_a_caller_answered_early_returns_while_its_batch_goes_on() -> None:
    release = asyncio.Event()

    async def handle(items: Sequence[int], answer: Answer[int]) -> list[int]:
        answer(0, -1)                   # e.g. its deadline share ran out: answered alone, now
        await release.wait()
        return [i * 2 for i in items]

    c: Coalescer[int, int] = Coalescer(handle, max_rows=8, max_wait_us=0)
    early, late = asyncio.create_task(c.submit(1)), asyncio.create_task(c.submit(2))
    assert await asyncio.wait_for(early, BOUND_S) == -1
    assert not late.done()
    release.set()
    assert await asyncio.wait_for(late, BOUND_S) == 4     # the batch's own result, for the others
    await c.close()


async def test_a_batch_logs_under_its_callers_request_ids_not_the_first_callers_ever() -> None:
    """The runner starts in the context of whichever call came first; its id must not leak into later batches."""
    from recsvc.logs import request_id

    seen: list[str] = []

    async def handle(items: Sequence[int], _: Answer[int]) -> list[int]:
        seen.append(request_id.get())
        return list(items)

    c: Coalescer[int, int] = Coalescer(handle, max_rows=10, max_wait_us=20_000)

    async def call(rid: str, item: int) -> int:
        request_id.set(rid)              # as the interceptor does, in the call's own task
        return await c.submit(item)

    assert await asyncio.gather(asyncio.create_task(call("first", 1)), asyncio.create_task(call("second", 2))) == [1, 2]
    assert await asyncio.create_task(call("later", 3)) == 3
    assert await asyncio.create_task(call("", 4)) == 4               # a caller with no id (a prefetch)
    assert seen == ["first,second", "later", ""]
    await c.close()
