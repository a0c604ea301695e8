"""One frozen settings object: defaults < environment (``RECSVC_*``) < explicit overrides (CLI flags).

Every field has a finite default, so nothing waits forever and the service runs with no configuration
at all (embedded history store, Triton on localhost). Unknown ``RECSVC_*`` variables and unknown override
keys are rejected rather than ignored: a typo in a deployment must fail loudly, not silently fall back.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsvc.errors import ConfigError

__all__ = ["CHOICES", "ENV_PREFIX", "REFERENCE", "Settings", "load_settings", "target_problem"]

ENV_PREFIX = "RECSVC_"
# Every setting with its default and meaning, generated from this file (recsvc/config_reference.py).
REFERENCE = "docs/CONFIGURATION.md"
# The settings that take one of a few words (checked at load, listed in the reference).
CHOICES: dict[str, tuple[str, ...]] = {
    "history_store": ("sqlite", "redis"),
    "l1_policy": ("lru", "tinylfu", "learned"),
    "l2_backend": ("auto", "none", "memory", "redis"),
    "index_kind": ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw", "cagra"),
    "index_device": ("auto", "cpu", "gpu", "torch"),
    "index_gpu_mode": ("replicate", "shard"),
    "event_loop": ("auto", "uvloop", "asyncio"),
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """All of recsvc's settings. Field ``foo_bar`` is read from ``RECSVC_FOO_BAR``."""

    # --- gRPC server ---
    host: str = "127.0.0.1"                  # address the gRPC server listens on (0.0.0.0: every interface)
    port: int = 50051                        # gRPC port (0: pick a free one; `recsvc serve --port-file F` writes it)
    workers: int = 1                         # server processes sharing the port (SO_REUSEPORT)
    # Let other processes bind the same port (SO_REUSEPORT) and share its connections. Off, so a second
    # server on a taken port fails instead of silently taking half its traffic; workers > 1 turns it on
    # for its own workers.
    reuse_port: bool = False
    metrics_port: int = 0                    # Prometheus text format on http://host:port/metrics (0: off)
    grace_s: float = 5.0                     # drain time on SIGTERM; matches the Helm terminationGracePeriod
    drain_delay_s: float = 5.0               # on SIGTERM: NOT_SERVING at once, keep serving this long, then stop
    request_timeout_s: float = 2.0           # budget when the client sends no deadline
    max_in_flight: int = 32                  # Recommend calls admitted at once; beyond: RESOURCE_EXHAUSTED + pushback
    max_in_flight_events: int = 32           # RecordEvents admitted at once (its own limit: reads never starve writes)
    # The server's asyncio event loop: asyncio | uvloop (pip install uvloop) | auto (uvloop where installed).
    # asyncio by default: grpc.aio polls its own completion queue, and uvloop served no more calls per
    # second in the A/B of docs/PERFORMANCE.md.
    event_loop: str = "asyncio"

    # --- API limits (documented in protos/recsvc/v1/recommender.proto) ---
    max_k: int = 100                         # largest k a Recommend call may ask for
    default_k: int = 10                      # Recommend's k when the request leaves it unset (0); <= max_k
    max_exclude: int = 500                   # exclude_item_ids per Recommend call
    max_context: int = 50                    # context_item_ids per Recommend call
    max_id_len: int = 128                    # bytes per id (users, items, events; also the deny list)
    max_events_per_call: int = 1000          # events per RecordEvents call
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC messages either way; larger: RESOURCE_EXHAUSTED (>= largest valid)

    # --- files ---
    data_dir: Path = Path("var")                     # history database, downloaded/generated data
    model_repository: Path = Path("model_repository")  # Triton's repository; bundles live in its versions

    # --- history: durable store ---
    history_store: str = "sqlite"            # sqlite (embedded, the default) | redis
    history_db: Path | None = None           # sqlite: default <data_dir>/history.sqlite3
    history_len: int = 50                    # most recent events the models see
    history_keep: int = 1000                 # events kept per user; also the "already seen" window
    redis_url: str = "redis://127.0.0.1:6379/0"   # durable store (history_store=redis), L2, invalidation
    redis_cluster: bool = False              # redis_url points at a Redis Cluster (L2 then defaults to none)
    redis_timeout_s: float = 1.0             # per Redis command; a slower store counts as down for that call
    # Invalidation subscriber: PING after this long without traffic; no PONG within redis_timeout_s means
    # a dead (e.g. half-open) connection: reconnect and clear L1, since invalidations may have been missed.
    invalidation_ping_s: float = 1.0
    # Processes sharing one SQLite store (workers > 1, or servers on one port with reuse_port) read which
    # users the others changed this often and drop those from their L1: the most a history served by one
    # process can lag a write made through another.
    sqlite_poll_s: float = 0.1

    # --- history: caches ---
    l1_policy: str = "tinylfu"               # lru | tinylfu (admission-filtered LRU) | learned (TinyLFU + model)
    l1_max_entries: int = 100_000            # users held in the in-process tier
    l1_max_bytes: int = 512 * 1024 * 1024    # ... and at most this many bytes of histories
    l1_ttl_s: float = 300.0                  # bounds staleness if an invalidation is ever lost
    negative_ttl_s: float = 10.0             # unknown users: cached briefly, so floods of them stay cheap
    l2_backend: str = "auto"                 # auto | none | memory (this process) | redis (shared); see resolved_l2
    l2_ttl_s: float = 600.0                  # how long an L2 entry lives
    # l2_backend=memory only (Redis bounds itself: maxmemory). Beside L1's bounds, so the process holds at
    # most l1_max_bytes + l2_max_bytes of histories.
    l2_max_entries: int = 100_000
    l2_max_bytes: int = 256 * 1024 * 1024    # l2_backend=memory only: bytes of histories held in L2
    vector_cache_entries: int = 100_000      # query vectors by (user, history version, index version)
    vector_cache_bytes: int = 256 * 1024 * 1024  # ... and at most this many bytes of them (ids, model input, vector)

    # --- prefetch ---
    prefetch_queue: int = 10_000             # pending warm-ups; beyond this they are dropped and counted
    prefetch_workers: int = 4                # tasks loading prefetched histories at once
    prefetch_learned: bool = False           # also prefetch the users a model of the request log expects next
    prefetch_interval_s: float = 1.0         # ... predicting each interval the users due in the next two
    warm_users: int = 1000                   # most active users warmed at start-up (0: none)

    # --- retrieval / ranking ---
    # Candidates retrieved per request, then ranked. 0: the served bundle's C (`recsvc train --candidates`,
    # default 100), which is also the most allowed: a larger value is refused when a version loads. The
    # ranker always scores C slots (fewer candidates are padded), so a lower value saves retrieval only.
    num_candidates: int = 0
    # Serve a bundle's item-to-item source and blend stage when it has them (`recsvc train`'s default). Off:
    # the two-tower candidates in the ranker's order, the previous pipeline, at about 2.3x the throughput
    # and lower quality (docs/PERFORMANCE.md, docs/EVALUATION.md); no retraining either way.
    blend: bool = True
    # Requests per pipeline batch (one encoder, search and Triton call each), and users per batched store
    # read of cache misses. No timer: one batch runs at a time and whatever arrives meanwhile is the next
    # one, up to this many.
    max_batch: int = 64

    # --- retrieval index (built by `recsvc build-index`, or at load when a version has none) ---
    index_kind: str = "auto"                 # auto | flat | ivf_flat | ivf_pq | hnsw | cagra
    index_flat_max_items: int = 200_000      # auto: exact (flat) up to this many items, ivf_flat above
    index_nlist: int = 0                     # IVF lists; 0: about 4 * sqrt(items)
    index_nprobe: int = 0                    # IVF lists probed; 0: tuned at build time to index_target_recall
    index_pq_m: int = 0                      # IVF-PQ sub-quantizers; 0: dim / 4
    index_hnsw_m: int = 32                   # HNSW graph degree
    index_ef_search: int = 0                 # HNSW search breadth; 0: tuned at build time
    index_target_recall: float = 0.95        # recall@index_recall_k vs exact that tuning aims for
    index_recall_k: int = 100                # k of the recall@k that index tuning measures
    index_device: str = "auto"               # auto (GPU when faiss sees one) | cpu | gpu | torch (exact, torch CUDA)
    index_gpu_mode: str = "replicate"        # several GPUs: replicate (throughput) | shard (catalogs too big for one)
    index_fp16: bool = False                 # GPU: store vectors in float16 (half the memory)
    # --- deny list and model versions ---
    deny_list: Path | None = None            # SKUs never recommended; default <data_dir>/deny_list.txt
    deny_poll_s: float = 1.0                 # how often the deny list file is checked for changes
    repository_poll_s: float = 2.0           # how often to look for a newer published version (0: never)
    rollout_drain_s: float = 30.0            # publish/rollback: time for replicas to switch and drain before unload
    rollout_ready_timeout_s: float = 120.0   # publish/rollback: longest wait for Triton to report a version ready

    # --- ranking (Triton) ---
    # Deadline shares: a stage may take this share of the time the request has left when it starts (rank:
    # at most triton_timeout_s too). Past it the answer falls back and is flagged degraded: history -> the
    # context items, else popular items; rank -> retrieval order. The rest stays for the later stages.
    history_budget_share: float = 0.5        # history lookup's share of the request's remaining time
    rank_budget_share: float = 0.5           # rank's share of what is left (at most triton_timeout_s)
    triton_url: str = "127.0.0.1:8001"       # gRPC endpoint of Triton
    triton_model: str = "ranker"             # model name in Triton and in model_repository/
    triton_timeout_s: float = 1.0            # longest a ranking call to Triton may take
    triton_http_port: int = 8000             # HTTP port (health, admin) of the Triton `recsvc triton`/`up` start
    triton_metrics_port: int = 8002          # Prometheus port of the Triton `recsvc triton`/`up` start
    triton_tls: bool = False                 # reach Triton's gRPC port over TLS (tritonserver --grpc-use-ssl)
    triton_ca: Path | None = None            # CA that signed Triton's certificate (default: the system's roots)
    triton_cert: Path | None = None          # client certificate for Triton's mutual TLS (--grpc-use-ssl-mutual)
    triton_key: Path | None = None           # its private key

    # --- security (README, "Security"); files are re-read when they change, so rotation needs no restart ---
    tls_cert: Path | None = None             # server certificate chain (PEM); with tls_key the port speaks TLS only
    tls_key: Path | None = None              # its private key (PEM, unencrypted)
    tls_client_ca: Path | None = None        # CA bundle client certificates are verified against (mutual TLS)
    tls_require_client_cert: bool = False    # mutual TLS: refuse clients without a certificate from tls_client_ca
    health_port: int = 0                     # plaintext port serving only grpc.health.v1, for probes (0: none)
    write_token_file: Path | None = None     # bearer tokens (one per line) RecordEvents and Prefetch require
    read_token_file: Path | None = None      # bearer tokens Recommend requires (unset: Recommend is open)
    write_allowed_identities: str = ""       # comma-separated client certificate CNs/SANs allowed to write
    secret_poll_s: float = 1.0               # how often certificate and token files are checked for changes

    def resolved_history_db(self) -> Path:
        """Path of the embedded history database."""
        return self.history_db if self.history_db is not None else self.data_dir / "history.sqlite3"

    def resolved_deny_list(self) -> Path:
        """Path of the deny list file (it need not exist: no file means nothing is denied)."""
        return self.deny_list if self.deny_list is not None else self.data_dir / "deny_list.txt"

    def resolved_l2(self) -> str:
        """The L2 backend to run (``auto``: memory, redis, or none on Redis Cluster, per the store)."""
        if self.l2_backend != "auto":
            return self.l2_backend
        if self.history_store == "sqlite":
            # A process-local L2 beside several processes' L1s would be one more copy to keep coherent.
            return "none" if self.shares_sqlite else "memory"
        return "none" if self.redis_cluster else "redis"

    @property
    def shares_sqlite(self) -> bool:
        """Whether other processes write the same SQLite store (workers, or servers sharing a port)."""
        return self.history_store == "sqlite" and (self.workers > 1 or self.reuse_port)

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with ``overrides`` applied (unknown keys rejected, values coerced)."""
        return _apply(self, overrides, source="override")


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, then ``env`` (default ``os.environ``), then ``overrides``.

    ``None`` overrides are skipped so CLI flags that were not given do not mask the environment.
    """
    env = os.environ if env is None else env
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value for key, value in env.items() if key.startswith(ENV_PREFIX)
    }
    settings = _apply(Settings(), from_env, source="environment")
    return _apply(settings, {k: v for k, v in overrides.items() if v is not None}, source="override")


def _apply(base: Settings, values: Mapping[str, Any], *, source: str) -> Settings:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    changes: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in fields:
            raise ConfigError(_unknown_setting(name, fields, source))
        changes[name] = _coerce(fields[name], raw, source)
    settings = dataclasses.replace(base, **changes)
    _validate(settings)
    return settings


def _unknown_setting(name: str, fields: Mapping[str, object], source: str) -> str:
    """The error for a name no field has: the closest valid names, else all of them, and where they are described."""
    import difflib  # only on this error path: keeps the import of the serving path lean

    def label(n: str) -> str:
        return f"{ENV_PREFIX}{n.upper()}" if source == "environment" else n

    close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(label(n) for n in close)}?"
    else:
        hint = f"valid names: {', '.join(label(n) for n in sorted(fields))}"
    return f"unknown setting {label(name)!r} (from {source}); {hint} (every setting is described in {REFERENCE})"


def _coerce(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    kind = str(f.type)
    try:
        if raw is None:
            if "None" in kind:
                return None
            raise ValueError("may not be empty")
        if kind.startswith("Path"):
            return Path(raw) if not (isinstance(raw, str) and raw == "" and "None" in kind) else None
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true/false")
        return str(raw)
    except (TypeError, ValueError) as exc:
        # From the environment, name the variable the user wrote.
        where = f"setting {f.name!r}"
        if source == "environment":
            where = f"{ENV_PREFIX}{f.name.upper()} ({where})"
        raise ConfigError(f"{where} from {source}: {raw!r} is not a valid {kind} ({exc})") from exc


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


def target_problem(target: str) -> str | None:
    """Why ``target`` is not a gRPC address to dial (host:port, port 1..65535), or None when it is one.

    Targets with a gRPC name scheme (``dns:///host:port``, ``unix:path``) are gRPC's to resolve. Why check:
    gRPC takes ``host:99999`` as port 34463 (it wraps) and reports a malformed one only when dialling.
    """
    if "://" in target or target.startswith("unix:"):
        return None
    match = _HOST_PORT.fullmatch(target)
    if match is None:
        return f"expected host:port, got {target!r}"
    if not 1 <= int(match.group(2)) <= 65535:
        return f"port {match.group(2)} of {target!r} is not in 1..65535"
    return None


def _validate(s: Settings) -> None:
    positive = [
        "max_k", "default_k", "max_exclude", "max_context", "max_id_len", "max_events_per_call", "history_len",
        "history_keep", "l1_max_entries", "l1_max_bytes", "vector_cache_entries",
        "prefetch_queue", "prefetch_workers", "max_batch", "workers", "index_flat_max_items",
        "index_hnsw_m", "index_recall_k", "vector_cache_bytes", "l2_max_entries", "l2_max_bytes",
    ]  # fmt: skip
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name!r} must be > 0, got {getattr(s, name)}")
    for name in ["index_nlist", "index_nprobe", "index_pq_m", "index_ef_search"]:
        if getattr(s, name) < 0:
            raise ConfigError(f"setting {name!r} must be >= 0 (0: automatic), got {getattr(s, name)}")
    if s.num_candidates < 0:
        raise ConfigError(f"setting 'num_candidates' must be >= 0 (0: the bundle's), got {s.num_candidates}")
    for name in ["history_budget_share", "rank_budget_share"]:
        if not 0 < getattr(s, name) <= 1:
            raise ConfigError(f"setting {name!r} must be in (0, 1], got {getattr(s, name)}")
    if not 0 < s.index_target_recall <= 1:
        raise ConfigError(f"setting 'index_target_recall' must be in (0, 1], got {s.index_target_recall}")
    if s.warm_users < 0:
        raise ConfigError(f"setting 'warm_users' must be >= 0, got {s.warm_users}")
    for name, allowed in CHOICES.items():
        if getattr(s, name) not in allowed:
            raise ConfigError(f"setting {name!r} must be one of {', '.join(allowed)}; got {getattr(s, name)!r}")
    if s.history_store == "redis" and s.l2_backend == "memory":
        # Other replicas' invalidations reach L1 through pub/sub, but a process-local L2 would hand the
        # stale history straight back: with a shared store, L2 must be shared too (or absent).
        raise ConfigError("l2_backend=memory cannot be used with history_store=redis; use redis, none or auto")
    if not 0 < s.invalidation_ping_s <= 60:
        # It bounds how long a dead subscription goes unnoticed (plus redis_timeout_s).
        raise ConfigError(f"setting 'invalidation_ping_s' must be in (0, 60] seconds, got {s.invalidation_ping_s}")
    if s.shares_sqlite and s.l2_backend == "memory":
        # Other processes' writes reach L1 through the store's change feed; a process-local L2 would hand
        # the stale history straight back.
        raise ConfigError("l2_backend=memory cannot be used with a SQLite store shared by several processes "
                          "(workers > 1 or reuse_port); use none or auto")  # fmt: skip
    if not 0 < s.sqlite_poll_s <= 60:
        raise ConfigError(f"setting 'sqlite_poll_s' must be in (0, 60] seconds, got {s.sqlite_poll_s}")
    for name in ["grace_s", "request_timeout_s", "triton_timeout_s", "redis_timeout_s", "l1_ttl_s",
                 "negative_ttl_s", "l2_ttl_s", "deny_poll_s", "rollout_ready_timeout_s",
                 "prefetch_interval_s"]:  # fmt: skip
        if not getattr(s, name) > 0:
            raise ConfigError(f"setting {name!r} must be > 0 seconds, got {getattr(s, name)}")
    for name in ["port", "metrics_port"]:
        if not 0 <= getattr(s, name) <= 65535:
            raise ConfigError(f"setting {name!r} must be in 0..65535, got {getattr(s, name)}")
    if not 0 <= s.drain_delay_s <= 600:
        # Kubernetes needs seconds to take a pod out of its endpoints; minutes would only delay every rollout.
        raise ConfigError(f"setting 'drain_delay_s' must be in 0..600 seconds, got {s.drain_delay_s}")
    for name in ["max_in_flight", "max_in_flight_events"]:
        if not 0 < getattr(s, name) <= 100_000:
            raise ConfigError(f"setting {name!r} must be in 1..100000, got {getattr(s, name)}")
    problem = target_problem(s.triton_url)
    if problem is not None:
        raise ConfigError(f"setting 'triton_url': {problem}")
    if s.rollout_drain_s < 0:
        raise ConfigError(f"setting 'rollout_drain_s' must be >= 0, got {s.rollout_drain_s}")
    if s.repository_poll_s < 0:
        raise ConfigError(f"setting 'repository_poll_s' must be >= 0 (0: never), got {s.repository_poll_s}")
    if s.default_k > s.max_k:
        raise ConfigError(f"default_k ({s.default_k}) cannot exceed max_k ({s.max_k}): lower RECSVC_DEFAULT_K too")
    if s.num_candidates and s.max_k > s.num_candidates:
        raise ConfigError(f"max_k ({s.max_k}) cannot exceed num_candidates ({s.num_candidates})")
    if s.history_keep < s.history_len:
        raise ConfigError(f"history_keep ({s.history_keep}) must be >= history_len ({s.history_len})")
    # Every valid request must fit: RecordEvents with max_events_per_call events of three max_id_len ids
    # (each with a tag and a length of up to 4 bytes), a type and a timestamp (< 40 bytes); Recommend with
    # all its ids; Prefetch with its 1000 user ids (validation.MAX_PREFETCH_USERS).
    largest = max(s.max_events_per_call * (3 * (s.max_id_len + 5) + 40),
                  (1 + s.max_context + s.max_exclude) * (s.max_id_len + 5) + 16, 1000 * (s.max_id_len + 5))  # fmt: skip
    if not largest <= s.max_message_bytes <= 256 * 1024 * 1024:
        raise ConfigError(f"setting 'max_message_bytes' must be in {largest}..{256 * 1024 * 1024} (the largest "
                          f"valid request under these limits is up to {largest} bytes), got {s.max_message_bytes}")
    _validate_security(s)


def _validate_security(s: Settings) -> None:
    # Only combinations that mean something: a half-configured TLS setup must not quietly serve plaintext.
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("settings 'tls_cert' and 'tls_key' go together: set both (TLS) or neither (plaintext)")
    if s.tls_client_ca is not None and s.tls_cert is None:
        raise ConfigError("setting 'tls_client_ca' needs TLS: set tls_cert and tls_key too")
    if s.tls_require_client_cert != (s.tls_client_ca is not None):
        # gRPC Python either requires and verifies a client certificate or never asks for one: a CA
        # without the requirement would verify nothing.
        raise ConfigError("settings 'tls_client_ca' and 'tls_require_client_cert' go together (mutual TLS)")
    if s.write_allowed_identities.strip() and not s.tls_require_client_cert:
        raise ConfigError("setting 'write_allowed_identities' needs mutual TLS "
                          "(tls_client_ca and tls_require_client_cert)")
    if s.read_token_file is not None and s.write_token_file is None and not s.write_allowed_identities.strip():
        # Otherwise anyone could write histories while reading needs a token: almost certainly a mistake.
        raise ConfigError("setting 'read_token_file' needs writes protected too (write_token_file or "
                          "write_allowed_identities)")
    if not 0 <= s.health_port <= 65535 or (s.health_port and s.health_port == s.port):
        raise ConfigError(f"setting 'health_port' must be in 0..65535 and differ from port, got {s.health_port}")
    if not 0 < s.secret_poll_s <= 3600:
        raise ConfigError(f"setting 'secret_poll_s' must be in (0, 3600] seconds, got {s.secret_poll_s}")
    if not s.triton_tls and any(p is not None for p in (s.triton_ca, s.triton_cert, s.triton_key)):
        raise ConfigError("settings 'triton_ca', 'triton_cert' and 'triton_key' need triton_tls=true")
    if (s.triton_cert is None) != (s.triton_key is None):
        raise ConfigError("settings 'triton_cert' and 'triton_key' go together: set both (mutual TLS) or neither")


