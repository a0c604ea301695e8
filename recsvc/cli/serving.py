"""Serving: `recsvc serve`, `recsvc seed`, and `recsvc up` (everything on the embedded defaults)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from recsvc.cli._common import DEMO_USER, options, print_recommendation, settings_of, version_catalog
from recsvc.cli.training import add_train_args, train_bundle
from recsvc.config import Settings
from recsvc.errors import ConfigError
from recsvc.offline.data_options import add_data_args, data_source, load_source

__all__ = ["how_to_query", "register"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC server (Triton must be reachable at triton_url for ranked answers)."""
    from recsvc.server import serve, write_port_file
    from recsvc.server.event_loop import run

    settings = settings_of(args)
    run(serve(settings, on_ready=write_port_file(args.port_file) if args.port_file else None), settings.event_loop)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Load a dataset's interactions into the history store (once: refuses a non-empty store)."""
    settings = settings_of(args)
    # The options are checked first; the data is loaded only once the store is known to be empty (a
    # refusal costs no file read).
    source = data_source(args)
    if not asyncio.run(_seed(settings, lambda: load_source(source))):
        if args.if_empty:
            print(f"history store {_where(settings)} already has users; left as it is (--if-empty)")
            return 0
        raise ConfigError(f"history store {_where(settings)} already has users; seed fills an empty store only "
                          "(seeding twice would double every history)")  # fmt: skip
    return 0


def _where(settings: Settings) -> str:
    return str(settings.resolved_history_db()) if settings.history_store == "sqlite" else settings.redis_url


async def _seed(settings: Settings, dataset: Any) -> bool:
    """Seed an empty store with ``dataset``'s events; False (nothing written) when it already has users.

    ``dataset`` is a Dataset, or a callable that loads one: called only once the store is known to be empty.
    """
    from tqdm import tqdm

    from recsvc.server.app import open_store

    store: Any = await open_store(settings)       # sqlite or redis: both have count_users and bulk_append
    try:
        if await store.count_users():
            return False
        ds = dataset() if callable(dataset) else dataset
        # Progress on a terminal only (disable=None): logs and pipes get the summary line alone.
        with tqdm(ds.event_rows(), total=ds.num_interactions, desc="seeding", unit=" events", unit_scale=True,
                  file=sys.stderr, disable=None, leave=False) as rows:  # fmt: skip
            n = await store.bulk_append(rows)
        print(f"seeded {n:,} events for {ds.num_users:,} users into {_where(settings)}")
        return True
    finally:
        await store.close()


# ------------------------------------------------------------------------------------------- up
def cmd_up(args: argparse.Namespace) -> int:
    """Everything in one command: data -> train -> publish -> seed -> Triton -> server -> a demo query.

    MovieLens by default; --interactions F [--items F] does the same for your own catalog.
    """
    import datetime as dt

    from recsvc.bundle import read_manifest, sha256_file
    from recsvc.repository import latest_version, publish, version_dir

    settings = settings_of(args)
    source = data_source(args)
    # The files' contents, recorded with the model: a re-run on an export that changed in place would
    # otherwise look like the same data and serve the old model and histories.
    digests = {k: sha256_file(Path(source[k])) for k in ("interactions", "items") if source.get(k)}
    repo, model = settings.model_repository, settings.triton_model
    latest = latest_version(repo, model)
    served = None
    if latest is not None:
        manifest = read_manifest(version_dir(repo, model, latest) / "bundle")
        # Bundles from before data sources were recorded: the MovieLens of the first `up`.
        served = manifest.extra.get("data_source") or ({"dataset": "movielens"} if manifest.dataset == "movielens"
                                                       else {"dataset": manifest.dataset})  # fmt: skip
    ds = load_source(source)
    if served is not None and "sha256" in served:
        trained_on = served["sha256"]
        served = {k: v for k, v in served.items() if k != "sha256"}
        same_files = served == source
        changed = [source[k] for k, digest in trained_on.items() if same_files and digests.get(k) != digest]
        if changed:
            if asyncio.run(_has_users(settings)):
                raise ConfigError(f"{', '.join(changed)} changed since {model} version {latest} in {repo} was "
                                  f"trained on it, and the history store {_where(settings)} holds the old export's "
                                  "users: start the new export in a fresh place (--data-dir DIR --model-repository "
                                  "DIR2)")  # fmt: skip
            served = None                    # nothing seeded from the old export: train on the new one
    if served != source:
        if latest is not None and asyncio.run(_has_users(settings)):
            # Seeding this data on top of another's histories would mix two shops' users.
            raise ConfigError(f"{repo / model} serves a model of other data and the history store {_where(settings)} "
                              "holds its users: start this data in a fresh place (--data-dir DIR "
                              "--model-repository DIR2)")  # fmt: skip
        print(f"training on {ds.name} ({'first run' if latest is None else 'new data'}; `up` reuses the model after)")
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        recorded = {**source, "sha256": digests} if digests else source
        bundle = train_bundle(args, settings.data_dir / "bundles" / f"{source['dataset']}-{stamp}", ds, recorded)
        version = publish(bundle, repo, model)
        print(f"published as {model} version {version}")
    if not asyncio.run(_seed(settings, ds)):
        print(f"history store {_where(settings)} already seeded; keeping its histories")
    if source["dataset"] == "movielens":
        demo_user, who = DEMO_USER, f"MovieLens user {DEMO_USER} recently watched"
    else:
        import numpy as np

        busiest = int(np.bincount(ds.users).argmax())
        demo_user = str(ds.user_ids[busiest])
        who = f"your most active user {demo_user!r} recently interacted with"
    from recsvc.server.event_loop import run

    return run(_up(settings, demo_user, who, exit_after_demo=args.exit_after_demo), settings.event_loop)


def how_to_query(target: str, user: str, item: str) -> str:
    """The commands ``up`` prints to try the server, quoted for a POSIX shell (ids may hold spaces or quotes)."""
    body = shlex.quote(json.dumps({"user_id": user, "k": 5}, ensure_ascii=False))
    user, item = shlex.quote(user), shlex.quote(item)
    return ("\nQuery it yourself (server reflection is on):\n"
            f"  grpcurl -plaintext -d {body} {target} recsvc.v1.Recommender/Recommend\n"
            f"  .venv/bin/recsvc recommend {user} --k 5 --target {target}\n"
            f"  .venv/bin/recsvc record {user} {item} --type view --target {target}\n"
            f"  grpcurl -plaintext {target} grpc.health.v1.Health/Check\n"
            "Ctrl-C stops the server and Triton.")  # fmt: skip


async def _has_users(settings: Settings) -> bool:
    from recsvc.server.app import open_store

    store: Any = await open_store(settings)
    try:
        return bool(await store.count_users())
    finally:
        await store.close()


async def _up(settings: Settings, demo_user: str, who: str, *, exit_after_demo: bool) -> int:
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
                rec = await client.recommend(demo_user, 10)
            catalog = version_catalog(settings, rec.model_version)
            print(f"\nrecsvc is serving on {target}. {who}:")
            for title in await _recent_titles(settings, demo_user, catalog, 8):
                print(f"  - {title}")
            print_recommendation(rec, catalog, demo_user)
            print(how_to_query(target, demo_user, rec.items[0].item_id if rec.items else "ITEM"))
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
    everything = options("data_dir", "model_repository", "triton_url")
    p = sub.add_parser("up", parents=[common, everything], help=_first_line(cmd_up.__doc__),
                       description=cmd_up.__doc__)
    p.add_argument("--port", type=int, help="gRPC port (RECSVC_PORT, default 50051)")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after printing the sample request")
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", parents=[common, everything], help=cmd_serve.__doc__)
    p.add_argument("--port", type=int, help="gRPC port; 0 picks a free one (RECSVC_PORT, default 50051)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("seed", parents=[common, options("data_dir")], help=cmd_seed.__doc__)
    add_data_args(p)
    p.add_argument("--if-empty", action="store_true",
                   help="a store that already has users is left alone with exit status 0 (for jobs that may run "
                        "again); without it that is an error")  # fmt: skip
    p.set_defaults(func=cmd_seed)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]
