"""Serving: `recsvc serve`, `recsvc seed`, and `recsvc up` (everything on the embedded defaults)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from recsvc.cli._common import DEMO_USER, latest_catalog, print_recommendation, settings_of
from recsvc.cli.training import add_train_args, train_bundle
from recsvc.config import Settings
from recsvc.offline.data_options import add_data_args, load_dataset

__all__ = ["register"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC server (Triton must be reachable at triton_url for ranked answers)."""
    from recsvc.server import serve, write_port_file

    settings = settings_of(args)
    asyncio.run(serve(settings, on_ready=write_port_file(args.port_file) if args.port_file else None,
                      snapshot_file=args.snapshot_file))  # fmt: skip
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Load a dataset's interactions into the history store (once: refuses a non-empty store)."""
    return asyncio.run(_seed(settings_of(args), load_dataset(args)))


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


# ------------------------------------------------------------------------------------------- up
def cmd_up(args: argparse.Namespace) -> int:
    """Everything on the embedded defaults: data -> train -> publish -> Triton -> server -> a demo query."""
    from recsvc.repository import latest_version, publish

    settings = settings_of(args)
    if latest_version(settings.model_repository, settings.triton_model) is None:
        print("no published model yet: training on MovieLens (first run only)")
        bundle = train_bundle(args, settings.data_dir / "bundles" / "movielens")
        version = publish(bundle, settings.model_repository, settings.triton_model)
        print(f"published as {settings.triton_model} version {version}")
    args.dataset = "movielens"
    asyncio.run(_seed(settings, load_dataset(args)))
    return asyncio.run(_up(settings, exit_after_demo=args.exit_after_demo))


async def _up(settings: Settings, *, exit_after_demo: bool) -> int:
    from recsvc.offline.triton_server import SupervisedTriton, options_from_settings
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
            catalog = latest_catalog(settings)
            print(f"\nrecsvc is serving on {target}. MovieLens user {DEMO_USER} recently watched:")
            for title in await _recent_titles(settings, DEMO_USER, catalog, 8):
                print(f"  - {title}")
            print_recommendation(rec, catalog, DEMO_USER)
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




def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add up, serve and seed."""
    p = sub.add_parser("up", parents=[common], help=cmd_up.__doc__)
    p.add_argument("--port", type=int, help="gRPC port (RECSVC_PORT, default 50051)")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after printing the sample request")
    add_train_args(p)
    p.set_defaults(func=cmd_up, dataset="movielens", seed=0)

    p = sub.add_parser("serve", parents=[common], help=cmd_serve.__doc__)
    p.add_argument("--port", type=int, help="gRPC port; 0 picks a free one (RECSVC_PORT, default 50051)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--snapshot-file", type=Path, help=argparse.SUPPRESS)   # set by the worker supervisor
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("seed", parents=[common], help=cmd_seed.__doc__)
    add_data_args(p)
    p.set_defaults(func=cmd_seed)
