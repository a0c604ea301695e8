"""The one place that knows how to connect to Redis (standalone or Cluster); the only importer of redis-py.

Everything else (the durable history store, the shared L2 tier, cross-replica invalidation) asks this
module for a client and catches ``REDIS_ERRORS``, so connection policy (timeouts, retries, cluster
discovery) is decided once and the import-boundary test can hold every other module to it.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

__all__ = ["REDIS_ERRORS", "RedisClient", "is_cluster", "redis_client", "server_configs"]

RedisClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.RedisCluster"

# Everything redis-py raises for an unreachable, failing or misconfigured server. RedisClusterException
# is not a RedisError (e.g. a cross-slot call, no reachable node); OSError covers socket errors that a
# client version might let through untranslated.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)

# A client built with timeout_s=None still gives up connecting.
_CONNECT_TIMEOUT_S = 5.0


def redis_client(
    url: str, *, cluster: bool = False, timeout_s: float | None = 1.0, retries: int = 1, decode_responses: bool = False
) -> RedisClient:
    """A redis.asyncio client for ``url`` (``redis://host:port/db``; a Cluster URL names any one node).

    No I/O happens here: connections open on first use. ``timeout_s`` bounds every connect and every
    socket read/write (None: block; nothing in recsvc passes it now: the pub/sub reader gives each read
    its own timeout), so a frozen or black-holed server fails a call within about ``timeout_s``.
    ``retries`` is how often a command is re-sent after a connection error; redis-py's default (10 with
    backoff up to 1 s) would turn a dead server into a multi-second stall, while one retry is what lets
    a pooled connection that a Redis restart closed reconnect without failing the call (so a restarted
    Redis is picked up without restarting recsvc). Pass 0 where every connection loss must be seen by
    the caller (a pub/sub subscriber: redis-py would resubscribe silently, hiding the gap).
    Timeouts are not retried on a standalone server: a timed-out write may have run, and re-sending a
    non-idempotent one (an append without event ids) would apply it twice. On a Cluster redis-py also
    retries timeouts, so that it can follow a failover; writes there should carry ids.

    TCP keepalive is on (explicitly: older redis-py left it off), so the kernel eventually drops idle
    connections to a vanished peer. There is no ``health_check_interval``: its PING before reusing an
    idle connection costs a round trip and catches nothing the retry above does not already handle (a
    closed connection) or that the socket timeout does not bound (a silent one).
    """
    connect_timeout = timeout_s if timeout_s is not None else _CONNECT_TIMEOUT_S
    backoff = ExponentialBackoff(cap=0.1, base=0.01)
    if cluster:
        return redis.asyncio.RedisCluster.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout, socket_keepalive=True,
            retry=Retry(backoff, retries), decode_responses=decode_responses,
        )  # fmt: skip
    return redis.asyncio.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout, socket_keepalive=True,
        retry=Retry(backoff, retries, supported_errors=(RedisConnectionError,)), decode_responses=decode_responses,
    )  # fmt: skip


def is_cluster(client: RedisClient) -> bool:
    """Whether ``client`` talks to a Redis Cluster (multi-key commands must then stay in one slot)."""
    return isinstance(client, redis.asyncio.RedisCluster)


async def server_configs(client: RedisClient, pattern: str) -> list[dict[str, str]]:
    """``CONFIG GET pattern`` from every server behind ``client`` (each primary of a Cluster).

    Raises one of ``REDIS_ERRORS`` where CONFIG is disabled (common on managed Redis).
    """
    if isinstance(client, redis.asyncio.RedisCluster):
        # With target_nodes the reply is {node name: {key: value}}, which redis-py's annotations do not say.
        per_node: Any = await client.config_get(pattern, target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
        return [_strs(config) for config in per_node.values()]
    return [_strs(await client.config_get(pattern))]


def _strs(config: Any) -> dict[str, str]:
    # Decoded or not depending on the client's decode_responses; callers compare strings.
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {text(k): text(v) for k, v in config.items()}
