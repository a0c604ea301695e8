"""`recsvc ...`: train, evaluate, publish, run Triton, serve, and `up` to do all of it at once."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsvc.config import Settings, load_settings
from recsvc.errors import ConfigError, RecsvcError

if TYPE_CHECKING:
    from recsvc.server.client import RecsvcClient

__all__ = ["main"]

log = logging.getLogger("recsvc")

# Demo user for MovieLens: ~200 ratings, mostly sci-fi and action, so the answer is visibly personal.
DEMO_USER = "41"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        port=getattr(args, "port", None),
        model_repository=getattr(args, "model_repository", None),
        data_dir=getattr(args, "data_dir", None),
        triton_url=getattr(args, "triton_url", None),
    )


# --------------------------------------------------------------------------------------------- data
def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["movielens", "synthetic", "files"], default="movielens",
                   help="built-in MovieLens (default), the synthetic e-commerce generator, or your own files")
    p.add_argument("--interactions", type=Path,
                   help="--dataset files: CSV/Parquet with user_id,item_id,timestamp[,event_type]")
    p.add_argument("--items", type=Path, help="--dataset files: optional CSV/Parquet with item_id[,title,category]")
    p.add_argument("--synthetic-users", type=int, default=20_000)
    p.add_argument("--synthetic-items", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)  # fmt: skip


def _load_dataset(args: argparse.Namespace) -> Any:
    from recsvc.data import generate_synthetic, load_files, load_movielens

    if args.dataset == "movielens":
        return load_movielens()
    if args.dataset == "synthetic":
        return generate_synthetic(args.synthetic_users, args.synthetic_items, seed=args.seed)
    if args.interactions is None:
        raise SystemExit("--dataset files needs --interactions PATH")
    return load_files(args.interactions, args.items)


# -------------------------------------------------------------------------------------------- train
def _train_bundle(args: argparse.Namespace, out: Path) -> Path:
    from recsvc.bundle import update_metrics
    from recsvc.data import time_split
    from recsvc.models.evaluate import evaluate_bundle
    from recsvc.models.train import TrainConfig, train, write_bundle

    ds = _load_dataset(args)
    print(f"dataset {ds.name}: {ds.num_users:,} users, {ds.num_items:,} items, {ds.num_interactions:,} interactions")
    config = TrainConfig(retrieval_epochs=args.epochs, ranker_epochs=args.ranker_epochs, seed=args.seed)
    if args.no_holdout:
        trained = train(ds, config)
        write_bundle(trained, ds, out)
    else:
        # Train on the time split's train part so the figures below are honest held-out figures.
        split = time_split(ds, test_per_user=args.test_per_user)
        trained = train(split.train, config)
        write_bundle(trained, split.train, out)
        report = evaluate_bundle(out, split.train, split.test, k=10, max_users=args.eval_users)
        update_metrics(out, report.as_metrics())
        print(f"\nheld-out evaluation (last {args.test_per_user} interactions per user, {report.users} users):")
        print(report.table())
    print(f"\ntrained in {trained.seconds:.0f} s; bundle written to {out}")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    """Train both models, export ONNX, evaluate, write a bundle."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out = args.out or _settings(args).data_dir / "bundles" / f"{args.dataset}-{stamp}"
    _train_bundle(args, out)
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=8, help="retrieval epochs")
    p.add_argument("--ranker-epochs", type=int, default=4)
    p.add_argument("--test-per-user", type=int, default=5, help="held-out latest interactions per user")
    p.add_argument("--eval-users", type=int, default=20_000, help="evaluate on at most this many users")
    p.add_argument("--no-holdout", action="store_true", help="train on everything (no evaluation)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a bundle on the time split of the data it was trained on."""
    from recsvc.data import time_split
    from recsvc.models.evaluate import evaluate_bundle

    split = time_split(_load_dataset(args), test_per_user=args.test_per_user)
    report = evaluate_bundle(args.bundle, split.train, split.test, k=args.k, max_users=args.eval_users)
    print(report.table())
    return 0


# ------------------------------------------------------------------------------------ repository
def cmd_publish(args: argparse.Namespace) -> int:
    """Publish a bundle as the next ranker version, then roll it out through Triton (load, canary, switch, drain)."""
    from recsvc.repository import publish
    from recsvc.repository.rollout import rollout_lock

    settings = _settings(args)
    repo, model = settings.model_repository, settings.triton_model
    with rollout_lock(repo, model):
        version = publish(args.bundle, repo, model, target=args.target)
        print(f"published {args.bundle} as {model} version {version} in {repo}")
        if args.no_rollout:
            return 0
        return _rollout(settings, version, args.drain_s)


def cmd_render_config(args: argparse.Namespace) -> int:
    """Write the model's config.pbtxt for a Triton target (cpu, gpu, gpu-onnx, gpu-torch)."""
    from recsvc.bundle import read_manifest
    from recsvc.repository import latest_version, version_dir
    from recsvc.repository.publishing import write_config

    settings = _settings(args)
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

    settings = _settings(args)
    with rollout_lock(settings.model_repository, settings.triton_model):
        return _rollout(settings, args.version, args.drain_s)


def cmd_triton_sync(args: argparse.Namespace) -> int:
    """Keep one Triton (e.g. the one beside this sidecar) holding exactly the versions serving.json lists."""
    from recsvc.errors import RankerUnavailable
    from recsvc.ranking import TritonRanker
    from recsvc.repository.rollout import reconcile

    settings = _settings(args)
    period = settings.repository_poll_s or 2.0

    async def run() -> None:
        triton = TritonRanker.from_settings(settings)
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

    settings = _settings(args)
    repo, model = settings.model_repository, settings.triton_model
    with rollout_lock(repo, model):
        state = read_serving(repo, model)
        target = args.to if args.to is not None else (state.previous if state else None)
        if target is None:
            raise ConfigError(f"nothing to roll back to: {repo / model} has no previous serving version (use --to)")
        return _rollout(settings, target, args.drain_s)


def _rollout(settings: Settings, version: int, drain_s: float | None) -> int:
    from recsvc.ranking import TritonRanker
    from recsvc.repository.rollout import rollout

    async def run() -> None:
        triton = TritonRanker.from_settings(settings, timeout_s=max(settings.triton_timeout_s, 10.0))
        try:
            report = await rollout(settings.model_repository, settings.triton_model, version, triton,
                                   drain_s=settings.rollout_drain_s if drain_s is None else drain_s,
                                   ready_timeout_s=settings.rollout_ready_timeout_s)  # fmt: skip
        finally:
            await triton.close()
        for name, seconds in report.steps:
            print(f"  {seconds:7.2f} s  {name}")
        print(f"{settings.triton_model} version {version} is serving (previous: {report.previous})")

    asyncio.run(run())
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    """Run the bundled tritonserver on the model repository (EXPLICIT model control), restarting it if it dies."""
    from recsvc.repository import options_from_settings, serve_triton

    models = () if args.no_models else None
    return asyncio.run(serve_triton(options_from_settings(_settings(args), models=models),
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
    queries = np.load(args.queries) if args.queries else None
    meta = build_bundle_index(args.bundle, spec, k=settings.index_recall_k, target=settings.index_target_recall,
                              queries=queries, progress=True)  # fmt: skip
    recall = "not measured (no queries.npy and no --queries)" if meta.recall is None else f"{meta.recall:.4f}"
    print(f"{args.bundle}: {meta.spec.describe()} over {meta.num_items:,} items x {meta.dim}, "
          f"built in {meta.build_seconds} s")  # fmt: skip
    for step in meta.tuning:
        print("  tried " + " ".join(f"{k}={v:g}" for k, v in step.items()))
    print(f"recall@{meta.recall_k} vs exact on {meta.queries} held-out queries: {recall}")
    return 0


def cmd_update_catalog(args: argparse.Namespace) -> int:
    """Add cold-start items (content-based embeddings from their category) and retire items, as a new bundle."""
    from recsvc.catalog_update import read_items, update_catalog

    add = read_items(args.add) if args.add else None
    result = update_catalog(args.bundle, args.out, add=add, retire=args.retire)
    print(f"{args.out}: {result.added} items added, {result.reactivated} re-activated, {result.retired} retired; "
          f"{result.num_items:,} items ({result.model_items:,} known to the models). Publish it with "
          f"`recsvc publish {args.out}`")  # fmt: skip
    return 0


def cmd_deny(args: argparse.Namespace) -> int:
    """Show or change the deny list (SKUs never recommended); running servers pick it up within a second."""
    from recsvc.deny import read_deny_list, update_deny_list

    settings = _settings(args)
    path = settings.resolved_deny_list()
    if args.action == "list":
        skus = read_deny_list(path)
    else:
        skus = update_deny_list(path, add=args.skus if args.action == "add" else (),
                                remove=args.skus if args.action == "remove" else (), clear=args.action == "clear",
                                max_id_len=settings.max_id_len)  # fmt: skip
    for sku in sorted(skus):
        print(sku)
    print(f"{len(skus)} SKUs denied ({path})", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------- serving
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC server (Triton must be reachable at triton_url for ranked answers)."""
    from recsvc.server import serve, write_port_file

    settings = _settings(args)
    asyncio.run(serve(settings, on_ready=write_port_file(args.port_file) if args.port_file else None))
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Load a dataset's interactions into the history store (once: refuses a non-empty store)."""
    return asyncio.run(_seed(_settings(args), _load_dataset(args)))


async def _seed(settings: Settings, ds: Any) -> int:
    from recsvc.server.app import open_store

    store: Any = await open_store(settings)       # sqlite or redis: both have count_users and bulk_append
    where = settings.resolved_history_db() if settings.history_store == "sqlite" else settings.redis_url
    try:
        if await store.count_users():
            print(f"history store {where} already has users; not seeding again")
            return 0
        n = await store.bulk_append(ds.event_rows())
        print(f"seeded {n:,} events for {ds.num_users:,} users into {where}")
        return 0
    finally:
        await store.close()


def _print_recommendation(rec: Any, catalog: Any, user: str) -> None:
    print(f"\nRecommend(user_id={user!r}) -> model version {rec.model_version}, index {rec.index_version}"
          + (f", DEGRADED: {rec.degraded_reason}" if rec.degraded else ""))  # fmt: skip
    for rank, item in enumerate(rec.items, 1):
        title = catalog.title(item.item_id) if catalog is not None else ""
        print(f"  {rank:2d}. {item.item_id:>10}  {item.score:8.3f}  {title}")


def _latest_catalog(settings: Settings) -> Any:
    from recsvc.catalog import Catalog
    from recsvc.repository import latest_version

    version = latest_version(settings.model_repository, settings.triton_model)
    if version is None:
        return None
    return Catalog.read(settings.model_repository / settings.triton_model / str(version) / "bundle" / "items.parquet")


# The client's token comes from --token-file or this variable (not RECSVC_*: those are server settings,
# and the server refuses any it does not know).
TOKEN_ENV = "RECOMMENDER_TOKEN"


def _client(args: argparse.Namespace, settings: Settings) -> RecsvcClient:
    import os

    from recsvc.server.client import RecsvcClient
    from recsvc.server.security import read_token

    token = read_token(args.token_file) if args.token_file is not None else os.environ.get(TOKEN_ENV) or None
    return RecsvcClient(args.target or f"{settings.host}:{settings.port}", tls=args.tls, ca=args.ca,
                        cert=args.cert, key=args.key, token=token)  # fmt: skip


def cmd_recommend(args: argparse.Namespace) -> int:
    """Ask a running server for recommendations and print them with titles."""
    settings = _settings(args)

    async def run() -> Any:
        async with _client(args, settings) as client:
            return await client.recommend(args.user, args.k, context=args.context, exclude=args.exclude)

    _print_recommendation(asyncio.run(run()), _latest_catalog(settings), args.user)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Send one event to a running server."""
    from recsvc.domain import Event, EventType

    settings = _settings(args)
    event = Event(args.user, args.item, EventType[args.type.upper()], time.time())

    async def run() -> int:
        async with _client(args, settings) as client:
            return await client.record([event])

    print(f"accepted {asyncio.run(run())} event(s)")
    return 0


# ------------------------------------------------------------------------------------------- up
def cmd_up(args: argparse.Namespace) -> int:
    """Everything on the embedded defaults: data -> train -> publish -> Triton -> server -> a demo query."""
    from recsvc.repository import latest_version, publish

    settings = _settings(args)
    if latest_version(settings.model_repository, settings.triton_model) is None:
        print("no published model yet: training on MovieLens (first run only)")
        bundle = _train_bundle(args, settings.data_dir / "bundles" / "movielens")
        version = publish(bundle, settings.model_repository, settings.triton_model)
        print(f"published as {settings.triton_model} version {version}")
    args.dataset = "movielens"
    asyncio.run(_seed(settings, _load_dataset(args)))
    return asyncio.run(_up(settings, exit_after_demo=args.exit_after_demo))


async def _up(settings: Settings, *, exit_after_demo: bool) -> int:
    from recsvc.repository import SupervisedTriton, options_from_settings
    from recsvc.server import serve
    from recsvc.server.client import RecsvcClient

    options = options_from_settings(settings)
    print(f"starting Triton (gRPC {settings.triton_url}, log {options.log_path}) ...")
    async with SupervisedTriton(options):        # restarted if it dies; recsvc loads its version again
        stop = asyncio.Event()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve(settings, on_ready=ready.set_result, stop=stop))
        try:
            waiting: set[asyncio.Future[Any]] = {server, ready}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if server in done:
                server.result()          # start-up failed: raise its error
                return 1
            port = ready.result()
            target = f"{settings.host}:{port}"
            async with RecsvcClient(target) as client:
                rec = await client.recommend(DEMO_USER, 10)
            catalog = _latest_catalog(settings)
            print(f"\nrecsvc is serving on {target}. MovieLens user {DEMO_USER} recently watched:")
            for title in await _recent_titles(settings, DEMO_USER, catalog, 8):
                print(f"  - {title}")
            _print_recommendation(rec, catalog, DEMO_USER)
            print(
                "\nQuery it yourself (server reflection is on):\n"
                f"  grpcurl -plaintext -d '{{\"user_id\": \"{DEMO_USER}\", \"k\": 5}}' {target} "
                "recsvc.v1.Recommender/Recommend\n"
                f"  .venv/bin/recsvc recommend {DEMO_USER} --k 5 --target {target}\n"
                f"  .venv/bin/recsvc record {DEMO_USER} 1 --type view --target {target}   (Toy Story)\n"
                f"  grpcurl -plaintext {target} grpc.health.v1.Health/Check\n"
                "Ctrl-C stops the server and Triton."
            )
            if exit_after_demo:
                stop.set()
            await server
        finally:
            if not server.done():
                stop.set()
                await server
    return 0


async def _recent_titles(settings: Settings, user: str, catalog: Any, n: int) -> list[str]:
    from recsvc.history import SqliteHistoryStore

    store = await SqliteHistoryStore.open(settings.resolved_history_db(), keep=settings.history_keep)
    try:
        history = await store.get(user, n)
    finally:
        await store.close()
    return [catalog.title(item) or item for item in reversed(history.item_ids)]


# ----------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["auto", "json", "text"], default="auto")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="default var/ (RECSVC_DATA_DIR)")
    common.add_argument("--model-repository", type=Path, help="default model_repository/ (RECSVC_MODEL_REPOSITORY)")
    common.add_argument("--triton-url", help="Triton gRPC host:port (RECSVC_TRITON_URL)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", parents=[common], help=cmd_up.__doc__)
    p.add_argument("--port", type=int, help="gRPC port (RECSVC_PORT, default 50051)")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after printing the sample request")
    _add_train_args(p)
    p.set_defaults(func=cmd_up, dataset="movielens", seed=0)

    p = sub.add_parser("train", parents=[common], help=cmd_train.__doc__)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--out", type=Path, help="bundle directory (default <data-dir>/bundles/<dataset>-<time>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help=cmd_evaluate.__doc__)
    p.add_argument("bundle", type=Path)
    _add_data_args(p)
    p.add_argument("--test-per-user", type=int, default=5)
    p.add_argument("--eval-users", type=int, default=20_000)
    p.add_argument("--k", type=int, default=10)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("publish", parents=[common], help=cmd_publish.__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-rollout", action="store_true", help="only write the version (Triton not contacted)")
    p.add_argument("--target", choices=["cpu", "gpu", "gpu-onnx", "gpu-torch"], default="cpu",
                   help="Triton target of config.pbtxt when the model has none yet (see render-config)")
    p.add_argument("--drain-s", type=float, help="wait before unloading the old version (RECSVC_ROLLOUT_DRAIN_S)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("render-config", parents=[common], help=cmd_render_config.__doc__)
    p.add_argument("--target", choices=["cpu", "gpu", "gpu-onnx", "gpu-torch"], required=True)
    p.add_argument("--bundle", type=Path, help="bundle whose L and C shape the warm-up (default: newest version's)")
    p.set_defaults(func=cmd_render_config)

    p = sub.add_parser("rollout", parents=[common], help=cmd_rollout.__doc__)
    p.add_argument("version", type=int)
    p.add_argument("--drain-s", type=float, help="wait before unloading the old version (RECSVC_ROLLOUT_DRAIN_S)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("triton-sync", parents=[common], help=cmd_triton_sync.__doc__)
    p.add_argument("--once", action="store_true", help="one reconciliation, then exit")
    p.set_defaults(func=cmd_triton_sync)

    p = sub.add_parser("rollback", parents=[common], help=cmd_rollback.__doc__)
    p.add_argument("--to", type=int, help="version to serve (default: the previous serving version)")
    p.add_argument("--drain-s", type=float, help="wait before unloading the old version (RECSVC_ROLLOUT_DRAIN_S)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("build-index", parents=[common], help=cmd_build_index.__doc__)
    p.add_argument("bundle", type=Path)
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

    p = sub.add_parser("update-catalog", parents=[common], help=cmd_update_catalog.__doc__)
    p.add_argument("bundle", type=Path, help="the bundle to start from (e.g. model_repository/ranker/3/bundle)")
    p.add_argument("--out", type=Path, required=True, help="directory of the new bundle")
    p.add_argument("--add", type=Path, help="CSV/Parquet of new items: item_id[,title,category]")
    p.add_argument("--retire", nargs="*", default=[], help="SKUs never to retrieve again")
    p.set_defaults(func=cmd_update_catalog)

    p = sub.add_parser("deny", parents=[common], help=cmd_deny.__doc__)
    p.add_argument("action", choices=["list", "add", "remove", "clear"])
    p.add_argument("skus", nargs="*")
    p.set_defaults(func=cmd_deny)

    p = sub.add_parser("triton", parents=[common], help=cmd_triton.__doc__)
    p.add_argument("--no-models", action="store_true",
                   help="load nothing at start (like an official Triton image in EXPLICIT mode); recsvc pins it")
    p.add_argument("--no-restart", action="store_true",
                   help="exit when tritonserver dies (default: restart it, waiting 1 s doubling to 30 s)")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("serve", parents=[common], help=cmd_serve.__doc__)
    p.add_argument("--port", type=int, help="gRPC port; 0 picks a free one (RECSVC_PORT, default 50051)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("seed", parents=[common], help=cmd_seed.__doc__)
    _add_data_args(p)
    p.set_defaults(func=cmd_seed)

    from recsvc.bench.cache_sim import register as register_cache_sim

    register_cache_sim(sub)

    from recsvc.bench.compression import register as register_compress

    register_compress(sub)

    from recsvc.repository.engines import register as register_build_engine

    register_build_engine(sub)

    for name, func in (("recommend", cmd_recommend), ("record", cmd_record)):
        p = sub.add_parser(name, parents=[common], help=func.__doc__)
        p.add_argument("user")
        if name == "recommend":
            p.add_argument("--k", type=int, default=10)
            p.add_argument("--context", nargs="*", default=[])
            p.add_argument("--exclude", nargs="*", default=[])
        else:
            p.add_argument("item")
            p.add_argument("--type", choices=["view", "cart", "purchase"], default="view")
        p.add_argument("--target", help="host:port of the server (default host:port from settings)")
        p.add_argument("--tls", action="store_true", help="speak TLS (implied by --ca or --cert)")
        p.add_argument("--ca", type=Path, help="CA that signed the server's certificate (default: system roots)")
        p.add_argument("--cert", type=Path, help="client certificate, for a server that requires mutual TLS")
        p.add_argument("--key", type=Path, help="the client certificate's key")
        p.add_argument("--token-file", type=Path, help=f"bearer token to send (first line; default ${TOKEN_ENV})")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `recsvc` console script."""
    from recsvc.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except RecsvcError as exc:
        print(f"recsvc {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
