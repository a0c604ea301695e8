"""Start the real bundled tritonserver for tests: reuse ``running_triton`` from any integration test.

    from tests.integration.triton_fixture import running_triton

    async with running_triton(repository) as (server, url):
        ranker = TritonRanker(url)

The repository must already hold the models to load (e.g. ``recsvc.repository.publish(bundle, repo)``).
Ports are picked free at start; the server log is written next to the repository and its error lines are
in the exception if start-up fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from recsvc.offline.triton_server import TritonOptions, TritonServer
from tests.support import free_ports

__all__ = ["running_triton"]


@contextlib.asynccontextmanager
async def running_triton(
    repository: Path,
    *,
    models: tuple[str, ...] = ("ranker",),
    log_path: Path | None = None,
    startup_timeout_s: float = 60.0,
) -> AsyncIterator[tuple[TritonServer, str]]:
    """Yield a started TritonServer serving ``repository`` and its gRPC url; stop it afterwards."""
    grpc_port, http_port, metrics_port = free_ports(3)
    options = TritonOptions(
        model_repository=repository,
        log_path=log_path if log_path is not None else repository.parent / f"tritonserver-{grpc_port}.log",
        models=models,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        startup_timeout_s=startup_timeout_s,
        exit_timeout_s=2.0,
    )
    server = TritonServer(options)
    await server.start()
    try:
        yield server, server.grpc_url
    finally:
        await server.stop()
