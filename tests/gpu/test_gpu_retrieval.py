"""GPU retrieval paths: faiss-gpu (replicated, sharded, float16, k > 2048) and the torch CUDA backend.

Skipped on hosts without a GPU (CI here has none); run on a GPU host with `pytest tests/gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.config import Settings
from recsvc.retrieval import FaissBackend, IndexRetriever, IndexSpec, TorchBackend, build_and_tune, open_retriever
from recsvc.retrieval.backends import GPU_MAX_K
from recsvc.retrieval.index_build import exact_top_k, faiss_gpus

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


needs_faiss_gpu = pytest.mark.skipif(faiss_gpus() == 0, reason="faiss sees no GPU (faiss-gpu not installed or no GPU)")
needs_cuda = pytest.mark.skipif(not _cuda(), reason="torch sees no CUDA device")


def _data(n: int = 20_000, d: int = 64, q: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((100, d)).astype(np.float32)
    emb = centers[rng.integers(0, 100, n)] + 0.5 * rng.standard_normal((n, d))
    queries = centers[rng.integers(0, 100, q)] + 0.5 * rng.standard_normal((q, d))
    return emb.astype(np.float32), queries.astype(np.float32)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(found, exact, strict=True)]))


@needs_cuda
@pytest.mark.parametrize("fp16", [False, True])
async def test_torch_cuda_exact_backend(fp16: bool) -> None:
    emb, queries = _data()
    exact = exact_top_k(emb, queries, 100)
    r = IndexRetriever(TorchBackend(emb, device="cuda", fp16=fp16))
    rows = await r.search(queries, 100, [set()] * len(queries))
    found = np.stack([ids for ids, _ in rows])
    assert _recall(found, exact) >= (0.99 if fp16 else 0.9999)
    r.set_denied(exact[0, :10].tolist())
    [(ids, _)] = await r.search(queries[:1], 100, [set()])
    assert not set(ids.tolist()) & set(exact[0, :10].tolist()) and len(ids) == 100
    await r.close()


@needs_faiss_gpu
@pytest.mark.parametrize(("mode", "fp16"), [("replicate", False), ("shard", False), ("replicate", True)])
async def test_faiss_gpu_flat_and_ivf(mode: str, fp16: bool) -> None:
    emb, queries = _data()
    exact = exact_top_k(emb, queries, 100)
    for kind in ("flat", "ivf_flat"):
        index, meta = build_and_tune(emb, IndexSpec(kind), queries, k=100, target=0.95)
        backend = FaissBackend(index, meta.spec, device="gpu", gpu_mode=mode, fp16=fp16)
        assert backend.device.startswith("gpu")
        r = IndexRetriever(backend, meta=meta)
        rows = await r.search(queries, 100, [set()] * len(queries))
        assert _recall(np.stack([ids for ids, _ in rows]), exact) >= (0.99 if kind == "flat" and not fp16 else 0.9)
        await r.close()


@needs_faiss_gpu
async def test_faiss_gpu_k_above_2048_falls_back_to_the_cpu_copy() -> None:
    emb, queries = _data()
    index, meta = build_and_tune(emb, IndexSpec("flat"), None)
    r = IndexRetriever(FaissBackend(index, meta.spec, device="gpu"), meta=meta)
    excluded = set(exact_top_k(emb, queries[:1], GPU_MAX_K + 100)[0].tolist())
    [(ids, _)] = await r.search(queries[:1], 50, [excluded])         # the bound exceeds the GPU's k limit
    assert len(ids) == 50 and not set(ids.tolist()) & excluded
    await r.close()


@needs_cuda
async def test_auto_device_uses_the_gpu(tmp_path: object) -> None:
    emb, _ = _data(n=5000)
    r = open_retriever(tmp_path, emb, Settings())  # type: ignore[arg-type]
    assert "gpu" in r.device or "cuda" in r.device
    await r.close()
