"""The model path: publish, roll out and back, render configs, sync and run Triton, build engines and indexes."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from recsvc.cli._common import options, settings_of
from recsvc.config import Settings, load_settings
from recsvc.errors import ConfigError, RecsvcError

__all__ = ["register"]

log = logging.getLogger("recsvc")


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish a bundle as the next ranker version, then roll it out through Triton (load, canary, switch, drain)."""
    from recsvc.repository import publish
    from recsvc.repository.rollout import rollout_lock

    settings = settings_of(args)
    repo, model = settings.model_repository, settings.triton_model
    with rollout_lock(repo, model):
        version = publish(args.bundle, repo, model, target=args.target)
        print(f"published {args.bundle} as {model} version {version} in {repo}")
        if args.no_rollout:
            return 0
        return _rollout(settings, version)


def cmd_render_config(args: argparse.Namespace) -> int:
    """Write the model's config.pbtxt for a Triton target (cpu, gpu, gpu-onnx, gpu-torch)."""
    from recsvc.bundle import read_manifest
    from recsvc.repository import latest_version, version_dir
    from recsvc.repository.publishing import write_config

    settings = settings_of(args)
    repo, model = settings.model_repository, settings.triton_model
    bundle = args.bundle
    if bundle is None:
        newest = latest_version(repo, model)
        if newest is None:
            raise ConfigError(f"no published version in {repo / model} to shape the warm-up on: pass --bundle")
        bundle = version_dir(repo, model, newest) / "bundle"
    path = write_config(repo / model, args.target, read_manifest(bundle))
    print(f"wrote {path} for target {args.target}; the next rollout loads versions with it")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """Roll a published version out: load it in Triton, canary, switch the service, drain, unload the old."""
    from recsvc.repository.rollout import rollout_lock

    settings = settings_of(args)
    with rollout_lock(settings.model_repository, settings.triton_model):
        return _rollout(settings, args.version)


def cmd_triton_sync(args: argparse.Namespace) -> int:
    """Keep one Triton (e.g. the one beside this sidecar) holding exactly the versions serving.json lists."""
    from recsvc.errors import RankerUnavailable
    from recsvc.ranking import TritonModels
    from recsvc.repository.rollout import reconcile

    settings = settings_of(args)
    period = settings.repository_poll_s or 2.0

    async def run() -> None:
        triton = TritonModels.from_settings(settings)
        try:
            while True:
                try:
                    await reconcile(settings.model_repository, settings.triton_model, triton)
                except RankerUnavailable as exc:
                    log.warning("triton not reachable yet: %s", exc)
                except RecsvcError as exc:
                    if args.once:
                        raise
                    # A damaged version or a bad serving.json: keep the sidecar (and what Triton holds) up.
                    log.error("cannot bring triton to serving.json's versions, retrying: %s", exc)
                if args.once:
                    return
                await asyncio.sleep(period)
        finally:
            await triton.close()

    asyncio.run(run())
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Roll back to the previous version (or --to V), with the same load, canary, switch and drain."""
    from recsvc.repository.rollout import read_serving, rollout_lock

    settings = settings_of(args)
    repo, model = settings.model_repository, settings.triton_model
    with rollout_lock(repo, model):
        state = read_serving(repo, model)
        target = args.to if args.to is not None else (state.previous if state else None)
        if target is None:
            raise ConfigError(f"nothing to roll back to: {repo / model} has no previous serving version (use --to)")
        return _rollout(settings, target)


def _rollout(settings: Settings, version: int) -> int:
    from recsvc.ranking import TritonChannel, TritonModels, TritonRanker
    from recsvc.repository.rollout import rollout

    async def run() -> None:
        channel = TritonChannel.from_settings(settings)
        timeout_s = max(settings.triton_timeout_s, 10.0)
        models = TritonModels.from_settings(settings, timeout_s=timeout_s, channel=channel)
        canary = TritonRanker.from_settings(settings, timeout_s=timeout_s, channel=channel)
        try:
            report = await rollout(settings.model_repository, settings.triton_model, version, models, canary,
                                   drain_s=settings.rollout_drain_s,
                                   ready_timeout_s=settings.rollout_ready_timeout_s)  # fmt: skip
        finally:
            await channel.close()
        for name, seconds in report.steps:
            print(f"  {seconds:7.2f} s  {name}")
        print(f"{settings.triton_model} version {version} is serving (previous: {report.previous})")

    asyncio.run(run())
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    """Run the bundled tritonserver on the model repository (EXPLICIT model control), restarting it if it dies."""
    from recsvc.offline.triton_server import options_from_settings, serve_triton

    models = () if args.no_models else None
    return asyncio.run(serve_triton(options_from_settings(settings_of(args), models=models),
                                    restart=not args.no_restart))  # fmt: skip


def cmd_build_index(args: argparse.Namespace) -> int:
    """Build the bundle's item index (kind from --kind or RECSVC_INDEX_*), tune it and store its recall."""
    import numpy as np

    from recsvc.bundle import read_manifest
    from recsvc.retrieval import IndexSpec
    from recsvc.retrieval.index_build import build_bundle_index

    settings = load_settings(index_kind=args.kind, index_nlist=args.nlist, index_nprobe=args.nprobe,
                             index_pq_m=args.pq_m, index_hnsw_m=args.hnsw_m, index_ef_search=args.ef_search,
                             index_recall_k=args.recall_k, index_target_recall=args.target_recall)  # fmt: skip
    manifest = read_manifest(args.bundle)
    spec = IndexSpec.from_settings(settings, manifest.num_items)
    queries = None
    if args.queries:
        try:
            queries = np.load(args.queries, allow_pickle=False)
        except ValueError as exc:           # not a .npy (numpy reads other bytes as a pickle, refused)
            raise ConfigError(f"--queries {args.queries}: not a NumPy .npy array ({exc})") from exc
    meta = build_bundle_index(args.bundle, spec, k=settings.index_recall_k, target=settings.index_target_recall,
                              queries=queries, progress=True)  # fmt: skip
    recall = "not measured (no queries.npy and no --queries)" if meta.recall is None else f"{meta.recall:.4f}"
    print(f"{args.bundle}: {meta.spec.describe()} over {meta.num_items:,} items x {meta.dim}, "
          f"built in {meta.build_seconds} s")  # fmt: skip
    for step in meta.tuning:
        print("  tried " + " ".join(f"{k}={v:g}" for k, v in step.items()))
    print(f"recall@{meta.recall_k} vs exact on {meta.queries} held-out queries: {recall}")
    return 0




def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add publish, render-config, rollout, triton-sync, rollback, build-index, triton and build-engine."""
    from recsvc.offline.engines import register as register_build_engine

    triton = options("model_repository", "triton_url")

    p = sub.add_parser("publish", parents=[common, triton], help=cmd_publish.__doc__)
    p.add_argument("bundle", type=Path, help="bundle directory (from `recsvc train` or `recsvc update-catalog`)")
    p.add_argument("--no-rollout", action="store_true", help="only write the version (Triton not contacted)")
    p.add_argument("--target", choices=["cpu", "gpu", "gpu-onnx", "gpu-torch"], default="cpu",
                   help="Triton target of config.pbtxt when the model has none yet (see render-config)")
    p.add_argument("--drain-s", type=float, help="wait before unloading the old version (RECSVC_ROLLOUT_DRAIN_S)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("render-config", parents=[common, options("model_repository")], help=cmd_render_config.__doc__)
    p.add_argument("--target", choices=["cpu", "gpu", "gpu-onnx", "gpu-torch"], required=True,
                   help="where Triton runs the ranker: CPU (python backend), or GPU as TensorRT, ONNX or torch")
    p.add_argument("--bundle", type=Path, help="bundle whose L and C shape the warm-up (default: newest version's)")
    p.set_defaults(func=cmd_render_config)

    p = sub.add_parser("rollout", parents=[common, triton], help=cmd_rollout.__doc__)
    p.add_argument("version", type=int, help="published version number to serve")
    p.add_argument("--drain-s", type=float, help="wait before unloading the old version (RECSVC_ROLLOUT_DRAIN_S)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("triton-sync", parents=[common, triton], help=cmd_triton_sync.__doc__)
    p.add_argument("--once", action="store_true", help="one reconciliation, then exit")
    p.set_defaults(func=cmd_triton_sync)

    p = sub.add_parser("rollback", parents=[common, triton], help=cmd_rollback.__doc__)
    p.add_argument("--to", type=int, help="version to serve (default: the previous serving version)")
    p.add_argument("--drain-s", type=float, help="wait before unloading the old version (RECSVC_ROLLOUT_DRAIN_S)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("build-index", parents=[common], help=cmd_build_index.__doc__)
    p.add_argument("bundle", type=Path, help="bundle directory whose item embeddings are indexed")
    p.add_argument("--kind", choices=["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"], help="RECSVC_INDEX_KIND")
    p.add_argument("--nlist", type=int, help="IVF lists (0: about 4 sqrt(items))")
    p.add_argument("--nprobe", type=int, help="IVF lists probed (0: tuned to --target-recall)")
    p.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantizers (0: dim/4)")
    p.add_argument("--hnsw-m", type=int, help="HNSW graph degree")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (0: tuned)")
    p.add_argument("--recall-k", type=int, help="k of the recall measurement (default 100)")
    p.add_argument("--target-recall", type=float, help="recall tuning aims for (default 0.95)")
    p.add_argument("--queries", type=Path, help="float32 [Q, dim] .npy of held-out queries (default the bundle's)")
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("triton", parents=[common, triton], help=cmd_triton.__doc__)
    p.add_argument("--no-models", action="store_true",
                   help="load nothing at start (like an official Triton image in EXPLICIT mode); recsvc pins it")
    p.add_argument("--no-restart", action="store_true",
                   help="exit when tritonserver dies (default: restart it, waiting 1 s doubling to 30 s)")
    p.set_defaults(func=cmd_triton)
    register_build_engine(sub)
