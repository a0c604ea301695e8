"""Search backends: where the top-k arithmetic runs (faiss on CPU or GPUs, or exact torch on CUDA).

A backend is blocking and single-threaded by contract: the retriever calls it from its one search
thread only (a GPU index must not be searched from two threads at once, faiss #367 and #985). Each
``search`` takes the current filter: a boolean mask over item ids where False means "never return".
Backends that can apply it inside the search (faiss CPU indexes through an IDSelector bitmap, torch
by masking scores) do so; the others say so, and the retriever over-fetches and filters afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from recsvc.errors import ConfigError
from recsvc.retrieval.index_build import IndexSpec, faiss_gpus, search_index, search_params

__all__ = ["GPU_MAX_K", "FaissBackend", "Filter", "SearchBackend", "TorchBackend", "torch_cuda_available"]

log = logging.getLogger(__name__)

# faiss GPU indexes answer at most k = 2048 per query (and IVF nprobe <= 2048); larger k runs on the CPU copy.
GPU_MAX_K = 2048

Result = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


class SearchBackend(Protocol):
    """Blocking top-k inner-product search over a fixed set of item vectors."""

    device: str
    filters_inside: bool        # True: ``allowed`` is applied inside the search (no over-fetch needed for it)

    @property
    def ntotal(self) -> int:
        """Items indexed."""
        ...

    def search(self, queries: npt.NDArray[np.float32], k: int, allowed: Filter | None) -> Result:
        """(scores [n, k], ids [n, k]) best first; id -1 where fewer than k items qualify."""
        ...

    def close(self) -> None:
        """Free device memory."""
        ...


class Filter:
    """An immutable allowed-mask over item ids, with the faiss IDSelector built from it once."""

    def __init__(self, allowed: npt.NDArray[np.bool_]) -> None:
        self.allowed = allowed
        self.denied = int(len(allowed) - np.count_nonzero(allowed))
        # IDSelectorBitmap reads bit (i & 7) of byte i >> 3; faiss keeps a pointer, so the bytes live here.
        self._bits = np.packbits(allowed, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(self._bits))
        self._torch: dict[str, Any] = {}

    def torch_mask(self, device: str) -> Any:
        """The mask as a torch bool tensor on ``device`` (made once per device)."""
        if device not in self._torch:
            import torch

            self._torch[device] = torch.from_numpy(self.allowed).to(device)
        return self._torch[device]


class FaissBackend:
    """A faiss index: on the CPU, or copied to every GPU faiss sees (replicated or sharded)."""

    def __init__(self, cpu_index: faiss.Index, spec: IndexSpec, *, device: str = "auto", gpu_mode: str = "replicate",
                 fp16: bool = False) -> None:  # fmt: skip
        self._cpu: faiss.Index | None = cpu_index
        self._spec = spec
        self._gpu: faiss.Index | None = None
        gpus = faiss_gpus()
        if device == "gpu" and gpus == 0:
            raise ConfigError("index_device=gpu but the installed faiss sees no GPU (is faiss-gpu installed?)")
        self.device = "cpu"
        if gpus and device in ("auto", "gpu"):
            if spec.kind == "hnsw":
                log.warning("faiss has no GPU HNSW; the hnsw index stays on the CPU (use cagra on GPUs)")
            else:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = gpu_mode == "shard"
                options.useFloat16 = fp16
                self._gpu = faiss.index_cpu_to_all_gpus(cpu_index, co=options)
                if spec.nprobe:
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", min(spec.nprobe, GPU_MAX_K))
                self.device = f"gpu x{gpus} ({gpu_mode}{', fp16' if fp16 else ''})"
        # GPU indexes take no IDSelector here: filtering is then done by over-fetching.
        self.filters_inside = self._gpu is None

    @classmethod
    def gpu_only(cls, gpu_index: faiss.Index, spec: IndexSpec) -> FaissBackend:
        """A backend over an index that exists only on the GPU (CAGRA); k is capped at 2048."""
        backend = cls.__new__(cls)
        backend._cpu = None
        backend._spec = spec
        backend._gpu = gpu_index
        backend.device = f"gpu ({spec.kind})"
        backend.filters_inside = False
        return backend

    @property
    def ntotal(self) -> int:
        """Items indexed."""
        index = self._cpu if self._cpu is not None else self._gpu
        assert index is not None
        return int(index.ntotal)

    def search(self, queries: npt.NDArray[np.float32], k: int, allowed: Filter | None) -> Result:
        """See SearchBackend. k > 2048 on a GPU backend is answered by the CPU copy of the index."""
        if self._cpu is None:
            assert self._gpu is not None
            scores, ids = self._gpu.search(queries, min(k, GPU_MAX_K))
            if k > GPU_MAX_K:   # no CPU copy to ask: pad, the retriever treats -1 as "no more items"
                scores = np.pad(scores, ((0, 0), (0, k - GPU_MAX_K)), constant_values=-np.inf)
                ids = np.pad(ids, ((0, 0), (0, k - GPU_MAX_K)), constant_values=-1)
            return scores, ids.astype(np.int64, copy=False)
        if self._gpu is not None and k <= GPU_MAX_K:
            scores, ids = self._gpu.search(queries, k)
        else:
            selector = allowed.selector if allowed is not None and allowed.denied else None
            params = search_params(self._cpu, self._spec, selector)
            scores, ids = search_index(self._cpu, self._spec, queries, k, params)
        return scores, ids.astype(np.int64, copy=False)

    def close(self) -> None:
        """Drop the GPU copies (the CPU index is freed with this object)."""
        self._gpu = None


def torch_cuda_available() -> bool:
    """Whether torch is installed (the ``gpu`` extra; a lean serving install has none) and sees a CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class TorchBackend:
    """Exact search with torch: one matmul and a top-k on the device (CUDA where faiss-gpu is missing)."""

    filters_inside = True

    def __init__(self, vectors: npt.NDArray[np.float32], *, device: str = "cuda", fp16: bool = False,
                 max_rows: int = 256) -> None:  # fmt: skip
        try:
            import torch
        except ModuleNotFoundError as exc:
            raise ConfigError("index_device=torch needs torch, which this install lacks: "
                              "pip install 'recsvc[gpu]' (or use index_device=cpu|gpu)") from exc  # fmt: skip
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("index_device=torch needs a CUDA device and torch does not see one")
        self._torch = torch
        self._dtype = torch.float16 if fp16 else torch.float32
        self._items = torch.from_numpy(np.ascontiguousarray(vectors)).to(device=device, dtype=self._dtype)
        self._max_rows = max_rows          # bounds the [rows, N] score matrix in device memory
        self.device = f"torch {device}{' fp16' if fp16 else ''}"
        self._dev = device

    @property
    def ntotal(self) -> int:
        """Items indexed."""
        return int(self._items.shape[0])

    def search(self, queries: npt.NDArray[np.float32], k: int, allowed: Filter | None) -> Result:
        """See SearchBackend; denied items are masked to -inf before the top-k."""
        torch = self._torch
        k_eff = min(k, self.ntotal)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        mask = allowed.torch_mask(self._dev) if allowed is not None and allowed.denied else None
        with torch.inference_mode():
            for start in range(0, len(queries), self._max_rows):
                q = torch.from_numpy(queries[start : start + self._max_rows]).to(self._dev, dtype=self._dtype)
                scores = (q @ self._items.T).float()
                if mask is not None:
                    scores.masked_fill_(~mask, -torch.inf)
                top = torch.topk(scores, k_eff, dim=1)
                s = top.values.cpu().numpy()
                i = top.indices.cpu().numpy()
                i[~np.isfinite(s)] = -1              # masked items are not results
                out_scores[start : start + len(s), :k_eff] = s
                out_ids[start : start + len(s), :k_eff] = i
        return out_scores, out_ids

    def close(self) -> None:
        """Free the device copy of the item vectors."""
        del self._items
