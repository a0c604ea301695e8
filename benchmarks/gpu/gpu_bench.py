"""The GPU table of docs/GPU.md in one run: retrieval, ranking and the GPU request path at 1M items.

    benchmarks/gpu/run OUTDIR            (the wrapper: carried wheels, nvidia-smi, a time limit)

Sections, each timed on its own and reported even when another fails:

1. retrieval: recsvc's TorchBackend (exact inner-product top-k on CUDA, the path `index_device=torch`
   takes), 1M items x 64, k = the ranked candidates (500), batches of 1, 64 and 256 queries, fp32 and
   fp16; recall@k against an exact float64 search on the CPU. faiss-gpu's GpuIndexFlatIP beside it when
   faiss sees a GPU.
2. ranking: recsvc's ranker network (RankerNet) on CUDA at 1M items, history 50, 500 candidates per row,
   batches of 1, 16, 64 and 256 rows, fp32 and fp16 (autocast); rows/s and p50/p99 per call.
3. request path: a batch of B users through the GPU stages as the batch-first server runs them (query
   tower, exact search for 500, ranking of the 500, top 10), B = 1, 64, 256: Recommend/s of the GPU part
   and its p99 per batch: what one GPU can do per host before gRPC and Python.
4. end to end: `recsvc bench --start` on this host (Triton, recsvc workers and the load generator all
   here) over a 1M-item stack with 500 ranked candidates, at 16, 64 and 256 calls in flight, when the
   serving stack is importable (tritonserver from nvidia-pytriton, tritonclient, faiss, hdrhistogram,
   psutil); otherwise the missing modules are recorded. ``--only end_to_end --e2e-items N`` runs it
   alone and smaller (the CPU test does).

Writes OUT/gpu.json and OUT/gpu.md. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ITEMS, DIM, HISTORY, CANDIDATES, K = 1_000_000, 64, 50, 500, 10
E2E_CONCURRENCY = (16, 64, 256)
E2E_STACK_S, E2E_BENCH_S = 180, 240        # within run's 470 s, after the ~60 s of the other sections


def _step(command: list[str], limit_s: float, env: dict[str, str] | None = None) -> None:
    try:
        subprocess.run(command, check=True, env=env, timeout=limit_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(command[1:4])} ... did not finish within {limit_s:.0f} s") from exc


def _timed(fn: Any, sync: Any, *, seconds: float, min_calls: int = 20) -> dict[str, float]:
    """Calls of ``fn`` back to back for ``seconds`` after a warm-up: calls/s and p50/p99 ms per call."""
    for _ in range(5):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return {"calls_per_s": round(len(times) / elapsed, 1), "p50_ms": round(times[len(times) // 2] * 1000, 3),
            "p99_ms": round(p99 * 1000, 3), "calls": len(times)}  # fmt: skip


def retrieval(seconds: float) -> list[dict[str, Any]]:
    import torch

    from recsvc.retrieval.backends import TorchBackend

    rng = np.random.default_rng(0)
    items = rng.standard_normal((ITEMS, DIM), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = rng.standard_normal((1024, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    check = queries[:16]
    exact = np.argsort(-(check.astype(np.float64) @ items.T.astype(np.float64)), axis=1)[:, :CANDIDATES]
    rows = []
    for fp16 in (False, True):
        backend = TorchBackend(items, device="cuda", fp16=fp16)
        _, ids = backend.search(check, CANDIDATES, None)
        recall = float(np.mean([len(set(ids[i]) & set(exact[i])) / CANDIDATES for i in range(len(check))]))
        for batch in (1, 64, 256):
            q = queries[:batch]
            t = _timed(lambda q=q, b=backend: b.search(q, CANDIDATES, None), torch.cuda.synchronize, seconds=seconds)
            rows.append({"engine": "recsvc TorchBackend", "precision": "fp16" if fp16 else "fp32", "batch": batch,
                         "queries_per_s": round(t["calls_per_s"] * batch, 1), **t,
                         "recall": round(recall, 4)})  # fmt: skip
        backend.close()
    try:
        import faiss

        if faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, DIM)
            index.add(items)
            for batch in (1, 64, 256):
                q = queries[:batch]
                t = _timed(lambda q=q: index.search(q, CANDIDATES), lambda: None, seconds=seconds)
                rows.append({"engine": "faiss GpuIndexFlatIP", "precision": "fp32", "batch": batch,
                             "queries_per_s": round(t["calls_per_s"] * batch, 1), **t})  # fmt: skip
    except ImportError:
        pass
    return rows


def _nets(device: str) -> tuple[Any, Any]:
    from recsvc.offline.models.ranker import RankerNet
    from recsvc.offline.models.retrieval import RetrievalNet

    retrieval_net = RetrievalNet(ITEMS, DIM, HISTORY)
    ranker = RankerNet(retrieval_net, dim=32, hidden=64)
    return retrieval_net.to(device).eval(), ranker.to(device).eval()


def ranking(seconds: float) -> list[dict[str, Any]]:
    import torch

    _, ranker = _nets("cuda")
    rows = []
    for precision in ("fp32", "fp16"):
        for batch in (1, 16, 64, 256):
            hist = torch.randint(0, ITEMS, (batch, HISTORY), device="cuda")
            cands = torch.randint(0, ITEMS, (batch, CANDIDATES), device="cuda")

            def run(hist: Any = hist, cands: Any = cands, precision: str = precision) -> None:
                half = precision == "fp16"
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                    ranker(hist, cands)

            t = _timed(run, torch.cuda.synchronize, seconds=seconds)
            rows.append({"precision": precision, "batch_rows": batch,
                         "rows_per_s": round(t["calls_per_s"] * batch, 1),
                         "candidates_scored_per_s": round(t["calls_per_s"] * batch * CANDIDATES), **t})  # fmt: skip
    return rows


def request_path(seconds: float) -> list[dict[str, Any]]:
    import torch

    from recsvc.retrieval.backends import TorchBackend

    retrieval_net, ranker = _nets("cuda")
    with torch.inference_mode():
        items = retrieval_net.item_vectors().float().cpu().numpy()
    backend = TorchBackend(items, device="cuda", fp16=True)
    rows = []
    for batch in (1, 64, 256):
        hist = torch.randint(0, ITEMS, (batch, HISTORY), device="cuda")

        def run(hist: Any = hist) -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                query = retrieval_net(hist).float().cpu().numpy()           # the server holds vectors on the host
                _, ids = backend.search(query, CANDIDATES, None)
                cands = torch.as_tensor(ids, device="cuda")
                scores = ranker(hist, cands)
                torch.topk(scores, K, dim=1).indices.cpu()

        t = _timed(run, torch.cuda.synchronize, seconds=seconds)
        rows.append({"batch": batch, "recommend_per_s": round(t["calls_per_s"] * batch, 1), **t})
    backend.close()
    return rows


def end_to_end(out: Path, seconds: float, items: int, users: int) -> dict[str, Any]:
    """`recsvc bench --start` against this host: Triton and recsvc started for the run, the load generator beside.

    The stack is benchmarks/make_1m_stack.py's (a consistent random bundle, its index, a seeded store) with
    ``items`` items and C = CANDIDATES ranked per request. On a CUDA host retrieval is recsvc's torch exact
    search on the GPU (RECSVC_INDEX_DEVICE=torch); the ranker is the bundle's ONNX model in Triton's python
    backend (the CPU template: the stack's ranker has no TorchScript twin for the gpu-torch one). Server
    workers: half the cores (at most 8); client processes: a quarter. Where scipy is importable the stack
    has the item-to-item source and the blend stage too (``make_1m_stack.py --item2item``), as trained
    bundles do.
    """
    needed = ["pytriton", "grpc", "tritonclient", "pyarrow", "onnxruntime", "hdrh", "psutil", "faiss"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not importable on this host: {', '.join(missing)} (the serving stack needs them)"}
    import torch

    # Not under OUT: the store and the index are large and only the report needs to come back.
    stack = Path(tempfile.mkdtemp(prefix="recsvc-e2e-"))
    try:
        return _end_to_end(stack, out, seconds, items, users, os.cpu_count() or 2, torch.cuda.is_available())
    finally:
        shutil.rmtree(stack, ignore_errors=True)


def _end_to_end(
    stack: Path, out: Path, seconds: float, items: int, users: int, cores: int, cuda: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    blend = importlib.util.find_spec("scipy") is not None
    # Each step has its own time limit, so a hang is this section's error, not the wrapper's kill of everything.
    _step([sys.executable, "benchmarks/make_1m_stack.py", str(stack), "--items", str(items), "--candidates",
           str(CANDIDATES), "--users", str(users), *(["--no-index"] if cuda else []),
           *(["--item2item"] if blend else [])], E2E_STACK_S)  # fmt: skip
    built_s = time.perf_counter() - t0
    workers, clients = max(1, min(8, cores // 2)), max(1, cores // 4)
    env = {**os.environ, "RECSVC_MODEL_REPOSITORY": str(stack / "repo"), "RECSVC_DATA_DIR": str(stack / "var"),
           "RECSVC_WORKERS": str(workers), "RECSVC_INDEX_DEVICE": "torch" if cuda else "auto",
           "RECSVC_INDEX_NPROBE": "16", "RECSVC_MAX_BATCH": "256",
           "RECSVC_MAX_IN_FLIGHT": "256"}  # fmt: skip
    report = out / "e2e"      # bench.json
    _step([sys.executable, "-m", "recsvc.cli", "bench", "--start", "--no-plots", "--out", str(report),
           "--duration", str(seconds), "--warmup", "2", "--processes", str(clients),
           "--concurrency", ",".join(str(c) for c in E2E_CONCURRENCY), "--label", "recsvc"],
          E2E_BENCH_S, env)  # fmt: skip
    bench = json.loads((report / "bench.json").read_text())
    levels = bench["configurations"]["recsvc"]["levels"]
    return {"items": items, "users": users, "candidates": CANDIDATES, "workers": workers, "client_processes": clients,
            "retrieval": "torch exact on CUDA" if cuda else "faiss on the CPU", "stack_built_s": round(built_s, 1),
            "item2item_and_blend": blend,
            "levels": [{"concurrency": lv["value"], "recommend_per_s": lv["throughput_per_s"],
                        "p50_ms": lv["latency_ms"]["p50"], "p99_ms": lv["latency_ms"]["p99"],
                        "failed": lv["failed"], "degraded": lv["degraded"], "cpu_cores": lv["cpu_cores"],
                        "stages_ms": (lv.get("breakdown") or {}).get("stages_ms")} for lv in levels]}  # fmt: skip


def main() -> None:
    """Run every section; write OUT/gpu.json and OUT/gpu.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement (default 2)")
    p.add_argument("--e2e-seconds", type=float, default=8.0, help="measured seconds per end-to-end level (default 8)")
    p.add_argument("--e2e-items", type=int, default=ITEMS, help="items of the end-to-end stack (default 1M)")
    p.add_argument("--e2e-users", type=int, default=50_000, help="users of the end-to-end stack (default 50k)")
    p.add_argument("--only", choices=("retrieval", "ranking", "request_path", "end_to_end"), help="one section")
    args = p.parse_args()
    import torch

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "items": ITEMS, "dim": DIM, "history": HISTORY, "candidates": CANDIDATES, "k": K,
    }  # fmt: skip
    sections = (("retrieval", lambda: retrieval(args.seconds)), ("ranking", lambda: ranking(args.seconds)),
                ("request_path", lambda: request_path(args.seconds)),
                ("end_to_end", lambda: end_to_end(args.out, args.e2e_seconds, args.e2e_items, args.e2e_users)))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, section in sections:
        if args.only not in (None, name):
            continue
        t0 = time.perf_counter()
        try:
            report[name] = section()
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        report[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {report[f'{name}_s']} s", file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu.md").write_text(_markdown(report))


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"GPU run {r['date']}: {r['gpu']}, Python {r['python']}, torch {r['torch']}; {r['items']:,} items x "
             f"{r['dim']}, {r['candidates']} candidates, history {r['history']}", ""]  # fmt: skip
    if isinstance(r.get("retrieval"), list):
        lines += ["| retrieval | precision | batch | queries/s | p50 ms | p99 ms | recall@500 |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['engine']} | {x['precision']} | {x['batch']} | {x['queries_per_s']:,.0f} | {x['p50_ms']} | "
                  f"{x['p99_ms']} | {x.get('recall', '')} |" for x in r["retrieval"]]  # fmt: skip
        lines.append("")
    if isinstance(r.get("ranking"), list):
        lines += ["| ranking | batch rows | rows/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        lines += [f"| RankerNet {x['precision']} | {x['batch_rows']} | {x['rows_per_s']:,.0f} | {x['p50_ms']} | "
                  f"{x['p99_ms']} |" for x in r["ranking"]]  # fmt: skip
        lines.append("")
    if isinstance(r.get("request_path"), list):
        lines += ["| GPU request path | batch | Recommend/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        lines += [f"| query + search + rank + top-k | {x['batch']} | {x['recommend_per_s']:,.0f} | {x['p50_ms']} | "
                  f"{x['p99_ms']} |" for x in r["request_path"]]  # fmt: skip
        lines.append("")
    e2e = r.get("end_to_end")
    if isinstance(e2e, dict) and e2e.get("levels"):
        lines += [f"End to end: `recsvc bench --start`, {e2e['items']:,} items, {e2e['candidates']} ranked, retrieval "
                  f"{e2e['retrieval']}, {e2e['workers']} server workers, {e2e['client_processes']} client processes "
                  "on the same host", "",
                  "| in flight | Recommend/s | p50 ms | p99 ms | failed | degraded | cores: server, Triton, client |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for lv in e2e["levels"]:
            cpu = ", ".join(str(lv["cpu_cores"].get(k)) for k in ("server", "triton", "client"))
            lines.append(f"| {lv['concurrency']:.0f} | {lv['recommend_per_s']:,.0f} | {lv['p50_ms']} | "
                         f"{lv['p99_ms']} | {lv['failed']} | {lv['degraded']} | {cpu} |")  # fmt: skip
        lines.append("")
    for name in ("retrieval", "ranking", "request_path", "end_to_end"):
        v = r.get(name)
        if isinstance(v, dict) and (v.get("error") or v.get("skipped")):
            lines.append(f"- {name}: {v.get('error') or v.get('skipped')}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
