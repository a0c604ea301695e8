"""Ceilings for `recsvc bench --ceilings`: what the parts recsvc is made of do alone, measured in the same run.

- gRPC: a bare grpc.aio server answering the same response (recsvc/offline/bench/echo.py), loaded by the
  same load generator at the same levels.
- FAISS: the served version's own index, searched for the served number of candidates by one thread,
  one query at a time and in batches of ``max_batch``.
- Triton: the served ranker version, called with raw tritonclient (one process, grpc.aio) at the same
  concurrencies, with the served history length and candidates.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsvc.config import Settings

from .loadgen import Level, LevelResult

__all__ = ["faiss_ceiling", "served_version", "triton_ceiling"]


def served_version(settings: Settings) -> tuple[int, Path]:
    """The version serving.json names (else the newest published) and its directory."""
    from recsvc.errors import ConfigError
    from recsvc.repository import latest_version, version_dir
    from recsvc.repository.rollout import read_serving

    repo, model = settings.model_repository, settings.triton_model
    state = read_serving(repo, model)
    version = state.version if state is not None else latest_version(repo, model)
    if version is None:
        raise ConfigError(f"no published version of {model!r} in {repo}: nothing to measure the ceilings on")
    return version, version_dir(repo, model, version)


def _queries(bundle: Any, n: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Query vectors as the service makes them: the bundle's encoder over histories of random items."""
    m = bundle.manifest
    history = rng.integers(0, m.num_items, size=(n, m.history_len), dtype=np.int64)
    return np.ascontiguousarray(bundle.encoder.encode_sync(history), dtype=np.float32)


def faiss_ceiling(settings: Settings, duration_s: float, *, seed: int = 0) -> dict[str, Any]:
    """Raw searches on the served index (blocking): one query per call, and batches of max_batch."""
    from recsvc.pipeline import load_serving_bundle

    from .loadgen import latency_histogram

    version, directory = served_version(settings)
    bundle = load_serving_bundle(directory, str(version), settings)
    try:
        from recsvc.retrieval.retriever import IndexRetriever

        assert isinstance(bundle.retriever, IndexRetriever)
        backend = bundle.retriever.backend
        k = min(settings.num_candidates or bundle.manifest.num_candidates, backend.ntotal)   # 0: the bundle's C
        rng = np.random.default_rng(seed)
        queries = _queries(bundle, 4096, rng)
        out: dict[str, Any] = {"version": version, "items": backend.ntotal, "k": k,
                               "device": getattr(backend, "device", "cpu")}  # fmt: skip
        for name, batch in (("single_query", 1), ("batched", settings.max_batch)):
            hist = latency_histogram()
            rows, i = 0, 0
            backend.search(queries[:batch], k, None)                 # warm
            start = time.perf_counter()
            while time.perf_counter() - start < duration_s:
                q = queries[(i * batch) % len(queries):][:batch]
                t0 = time.perf_counter()
                backend.search(q, k, None)
                hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
                rows += len(q)
                i += 1
            elapsed = time.perf_counter() - start
            out[name] = {"batch": batch, "rows_per_s": round(rows / elapsed, 1), "calls": i,
                                     "p50_ms": hist.get_value_at_percentile(50) / 1000,
                                     "p99_ms": hist.get_value_at_percentile(99) / 1000}  # fmt: skip
        return out
    finally:
        asyncio.run(bundle.close())


async def triton_ceiling(settings: Settings, levels: list[Level], *, seed: int = 0) -> list[LevelResult]:
    """Closed-loop raw tritonclient calls on the served ranker at each closed level's concurrency."""
    from tritonclient.grpc.aio import InferenceServerClient

    from recsvc.bundle import read_manifest

    version, directory = served_version(settings)
    manifest = read_manifest(directory / "bundle")
    rng = np.random.default_rng(seed)
    c = min(settings.num_candidates or manifest.num_candidates, manifest.num_candidates)    # 0: the bundle's C
    history = rng.integers(0, manifest.num_items, size=(1, manifest.history_len), dtype=np.int64)
    candidates = rng.integers(0, manifest.num_items, size=(1, c), dtype=np.int64)
    # The served model's candidate dimension is fixed (the bundle's C): pad as the service does.
    if c < manifest.num_candidates:
        candidates = np.pad(candidates, ((0, 0), (0, manifest.num_candidates - c)), constant_values=-1)
    client = InferenceServerClient(settings.triton_url)
    try:
        return [await _triton_level(client, settings.triton_model, str(version), history, candidates, level)
                for level in levels if level.mode == "closed"]  # fmt: skip
    finally:
        await client.close()


async def _triton_level(client: Any, model: str, version: str, history: npt.NDArray[np.int64],
                        candidates: npt.NDArray[np.int64], level: Level) -> LevelResult:  # fmt: skip
    from tritonclient.grpc import InferInput, InferRequestedOutput

    result = LevelResult(level)
    measure_from = time.perf_counter() + level.warmup_s
    stop_at = measure_from + level.duration_s

    async def caller() -> None:
        inputs = [InferInput("HISTORY", list(history.shape), "INT64"),
                  InferInput("CANDIDATES", list(candidates.shape), "INT64")]  # fmt: skip
        inputs[0].set_data_from_numpy(history)
        inputs[1].set_data_from_numpy(candidates)
        outputs = [InferRequestedOutput("SCORES")]
        while (now := time.perf_counter()) < stop_at:
            try:
                await client.infer(model, inputs, model_version=version, outputs=outputs, client_timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - every failure is counted by its kind
                code = type(exc).__name__
            else:
                code = "OK"
            done = time.perf_counter()
            if now >= measure_from:
                result.sent += 1
                result.codes[code] += 1
                if code == "OK":
                    result.ok += 1
                    result.histogram.record_value(max(1, int((done - now) * 1e6)))

    await asyncio.gather(*(caller() for _ in range(int(level.value))))
    result.elapsed_s = level.duration_s
    return result
