"""The gRPC ceiling: a bare grpc.aio Recommender that answers every call with one fixed response.

    python -m recsvc.offline.bench.echo --reply FILE --port-file FILE [--port N] [--event-loop asyncio]

It parses each request (as recsvc does) and returns the same RecommendResponse that recsvc returned to a
real call (FILE holds its serialized bytes), so the reply is exactly as large. Nothing else runs: what
this process serves per second on a core is the most any Python gRPC service can, and `recsvc bench
--ceilings` shows recsvc as a fraction of it. It runs on the event loop recsvc would (RECSVC_EVENT_LOOP),
so the ratio measures recsvc's own work, not a difference of loops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import grpc

from recsvc.server.event_loop import run
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

__all__ = ["main", "serve"]


class _Echo(pb_grpc.RecommenderServicer):
    def __init__(self, reply: pb.RecommendResponse) -> None:
        self._reply = reply

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecommendResponse:
        return self._reply


async def serve(reply: pb.RecommendResponse, host: str, port: int, port_file: Path | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(_Echo(reply), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if port_file is not None:
        await asyncio.to_thread(port_file.write_text, str(bound))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point (the bench starts this in its own process)."""
    p = argparse.ArgumentParser(prog="python -m recsvc.offline.bench.echo", description=__doc__.split("\n")[0])
    p.add_argument("--reply", type=Path, required=True, help="a serialized RecommendResponse to answer with")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (written to --port-file)")
    p.add_argument("--port-file", type=Path, help="where to write the bound port once serving")
    p.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"),
                   default=os.environ.get("RECSVC_EVENT_LOOP", "asyncio"), help="as recsvc's RECSVC_EVENT_LOOP")
    args = p.parse_args(argv)
    reply = pb.RecommendResponse.FromString(args.reply.read_bytes())
    run(serve(reply, args.host, args.port, args.port_file), args.event_loop)


if __name__ == "__main__":
    main()
