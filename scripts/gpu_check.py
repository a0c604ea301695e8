"""GPU check of the torch CUDA retrieval backend (recsvc.retrieval.backends.TorchBackend), for docs/GPU.md.

Run on the lent GPU machine (see docs/GPU.md for the exact command): exact top-100 over N random unit
vectors of dim 64, fp32 and fp16, batches of 64 queries. Recall is against an exact float64 numpy search
of the same items on the CPU; throughput is queries/s of TorchBackend.search after a warm-up. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from recsvc.retrieval.backends import TorchBackend


def main() -> None:
    """Measure and print the figures as JSON."""
    import torch

    rng = np.random.default_rng(0)
    dim, k, batch = 64, 100, 64
    runs: list[dict[str, object]] = []
    for n in (1_000_000, 10_000_000):
        items = rng.standard_normal((n, dim), dtype=np.float32)
        items /= np.linalg.norm(items, axis=1, keepdims=True)
        queries = rng.standard_normal((1024, dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        check = queries[:32]
        exact = np.argsort(-(check.astype(np.float64) @ items.T.astype(np.float64)), axis=1)[:, :k]
        for fp16 in (False, True):
            backend = TorchBackend(items, device="cuda", fp16=fp16)
            _, ids = backend.search(check, k, None)
            recall = float(np.mean([len(set(ids[i]) & set(exact[i])) / k for i in range(len(check))]))
            backend.search(queries[:batch], k, None)                       # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            for s in range(0, len(queries), batch):
                backend.search(queries[s : s + batch], k, None)
            torch.cuda.synchronize()
            qps = len(queries) / (time.perf_counter() - start)
            runs.append({"items": n, "dim": dim, "k": k, "batch": batch, "fp16": fp16,
                         "recall_at_100": round(recall, 4), "queries_per_s": round(qps)})
            backend.close()
            torch.cuda.empty_cache()
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # noqa: T201  (progress on the device log)
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "runs": runs}, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
