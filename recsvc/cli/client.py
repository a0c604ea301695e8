"""The bundled client: `recsvc recommend` and `recsvc record` against a running server."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsvc.cli._common import options, print_recommendation, settings_of, version_catalog
from recsvc.config import Settings, target_problem
from recsvc.errors import ConfigError

if TYPE_CHECKING:
    from recsvc.server.client import RecsvcClient

__all__ = ["TOKEN_ENV", "register"]

# The client's token comes from --token-file or this variable (not RECSVC_*: those are server settings,
# and the server refuses any it does not know).
TOKEN_ENV = "RECOMMENDER_TOKEN"


def _client(args: argparse.Namespace, settings: Settings) -> RecsvcClient:
    from recsvc.server.client import RecsvcClient
    from recsvc.server.security import read_token

    if args.target is not None and (problem := target_problem(args.target)) is not None:
        raise ConfigError(f"--target: {problem}")
    token = read_token(args.token_file) if args.token_file is not None else os.environ.get(TOKEN_ENV) or None
    return RecsvcClient(args.target or f"{settings.host}:{settings.port}", tls=args.tls, ca=args.ca,
                        cert=args.cert, key=args.key, token=token)  # fmt: skip


def cmd_recommend(args: argparse.Namespace) -> int:
    """Ask a running server for recommendations and print them with titles."""
    settings = settings_of(args)

    async def run() -> Any:
        async with _client(args, settings) as client:
            return await client.recommend(args.user, args.k, context=args.context, exclude=args.exclude)

    rec = asyncio.run(run())
    print_recommendation(rec, version_catalog(settings, rec.model_version), args.user)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Send one event to a running server."""
    from recsvc.domain import Event, EventType

    settings = settings_of(args)
    # An event id, so that a retried call (by gRPC's retry policy, or by the user running the same
    # command again with --event-id) is recognised by the server and stored once.
    event = Event(args.user, args.item, EventType[args.type.upper()], time.time(), args.event_id or uuid.uuid4().hex)

    async def run() -> tuple[int, int]:
        async with _client(args, settings) as client:
            return await client.record_counts([event])

    accepted, duplicates = asyncio.run(run())
    print(f"accepted {accepted} event(s)" + (f"; {duplicates} already stored (same event id), not stored again"
                                            if duplicates else ""))  # fmt: skip
    return 0



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add recommend and record."""
    titles = options("model_repository")      # recommend prints titles from the newest published catalog
    for name, func in (("recommend", cmd_recommend), ("record", cmd_record)):
        p = sub.add_parser(name, parents=[common, titles] if name == "recommend" else [common], help=func.__doc__,
                           description=func.__doc__)  # fmt: skip
        p.add_argument("user", help="user id, as your shop writes it")
        if name == "recommend":
            p.add_argument("--k", type=int, default=10, help="how many items (default 10)")
            p.add_argument("--context", nargs="*", default=[], metavar="ITEM",
                           help="items the user is looking at now (e.g. the cart)")
            p.add_argument("--exclude", nargs="*", default=[], metavar="ITEM", help="items never to return")
        else:
            p.add_argument("item", help="item id (SKU) the user acted on")
            p.add_argument("--type", type=str.lower, choices=["view", "cart", "purchase"], default="view",
                           help="what the user did (default view)")
            p.add_argument("--event-id", help="your id for this event; the server stores an event id once per user "
                                              "(default: a fresh random id)")  # fmt: skip
        p.add_argument("--target", help="host:port of the server (default host:port from settings)")
        p.add_argument("--tls", action="store_true", help="speak TLS (implied by --ca or --cert)")
        p.add_argument("--ca", type=Path, help="CA that signed the server's certificate (default: system roots)")
        p.add_argument("--cert", type=Path, help="client certificate, for a server that requires mutual TLS")
        p.add_argument("--key", type=Path, help="the client certificate's key")
        p.add_argument("--token-file", type=Path, help=f"bearer token to send (first line; default ${TOKEN_ENV})")
        p.set_defaults(func=func)
