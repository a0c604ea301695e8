"""`recsvc bench`: end-to-end Recommend load against a server, stage by stage, with ceilings in the same run.

    recsvc bench --start --concurrency 1,4,16,64 --rate 200,400 --ceilings

Load: closed loop (each --concurrency level) and open loop (each --rate, Poisson arrivals, latency from
the scheduled send time) from --processes client processes, users drawn from the history store by their
activity. Per level: answered calls per second, p50/p90/p99/p99.9 (HdrHistogram), failures by status code,
degraded answers, the server's per-stage times from its /metrics and Triton's, CPU of server, Triton and
client processes. --ceilings runs the same levels against a bare grpc.aio echo server with the same
response, and measures raw FAISS on the served index and raw tritonclient on the served ranker.
Writes bench.json, latency_cdf.png and load.png into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from recsvc.config import Settings, target_problem
from recsvc.errors import ConfigError

from .loadgen import Level, LevelResult, LoadGenerator
from .serverstats import CpuMeter, MetricsSnapshot, breakdown, listening_pids, scrape

__all__ = ["best_at_p99", "cmd_bench", "register"]

P99_BOUND_MS = 50.0


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be > 0, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `recsvc bench`."""
    p = sub.add_parser("bench", help="end-to-end Recommend load, stage by stage, with --ceilings in the same run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--target", help="host:port of a running server (default: RECSVC_HOST:RECSVC_PORT)")
    p.add_argument("--start", action="store_true",
                   help="start the server (and Triton, unless one answers at RECSVC_TRITON_URL) for the run, "
                        "with its metrics on; RECSVC_* variables configure it")  # fmt: skip
    p.add_argument("--concurrency", type=_floats, default=[1.0, 4.0, 16.0, 64.0], metavar="N,N,...",
                   help="closed-loop levels: calls in flight (default 1,4,16,64)")
    p.add_argument("--rate", type=_floats, default=[], metavar="R,R,...",
                   help="open-loop levels: calls per second offered, Poisson arrivals (default none)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level (default 2)")
    p.add_argument("--processes", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--k", type=int, default=10, help="items per Recommend (default 10)")
    p.add_argument("--deadline", type=float, default=2.0, help="each call's deadline in seconds (default 2)")
    p.add_argument("--users", type=int, default=100_000, help="most active users drawn from (default 100000)")
    p.add_argument("--users-file", type=Path, help="user ids, one per line (a repeated id is drawn more often)")
    p.add_argument("--ceilings", action="store_true", help="also measure the echo, FAISS and Triton ceilings")
    p.add_argument("--metrics-url", help="recsvc's /metrics (default: the started server's, or RECSVC_METRICS_PORT)")
    p.add_argument("--label", default="recsvc", help="name of this configuration in the report")
    p.add_argument("--out", type=Path, help="report folder (default var/bench/<time>)")
    p.add_argument("--no-plots", action="store_true", help="write bench.json only")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Entry point of `recsvc bench`."""
    from recsvc.config import load_settings

    if args.processes < 1 or args.duration <= 0 or args.warmup < 0 or args.k < 1 or args.deadline <= 0:
        raise ConfigError("--processes, --duration, --k and --deadline must be positive, --warmup >= 0")
    levels = [Level("closed", c, args.duration, args.warmup) for c in args.concurrency]
    levels += [Level("open", r, args.duration, args.warmup) for r in args.rate]
    if not levels:
        raise ConfigError("nothing to run: give --concurrency and/or --rate levels")
    if args.target is not None and (problem := target_problem(args.target)) is not None:
        raise ConfigError(f"--target: {problem}")
    settings = load_settings()
    out = args.out or Path("var") / "bench" / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with _stack(settings, start=args.start, log_dir=out) as (target, metrics_url):
        target = args.target or target
        metrics_url = args.metrics_url or metrics_url
        report = run_bench(settings, target, metrics_url, levels, args)
    report["command"] = "recsvc " + " ".join(sys.argv[1:])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plots:
        from .plots import plot_report

        plot_report(report, out)
    sys.stdout.write(format_table(report) + "\n")
    plots = "" if args.no_plots else " and plots (latency_cdf.png, load.png)"
    sys.stdout.write(f"\nwrote {out / 'bench.json'}{plots}\n")
    return 0


# ------------------------------------------------------------------------------------------ the run
def run_bench(settings: Settings, target: str, metrics_url: str | None, levels: list[Level],
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Every level against ``target`` (and the ceilings when asked); the report as a dict."""
    users, weights = _users(settings, args)
    sample = _sample_reply(target, users[0], args.k, args.deadline)
    triton_host, triton_port = settings.triton_url.rsplit(":", 1)
    triton_metrics = f"http://{triton_host}:{settings.triton_metrics_port}/metrics"
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
        "target": target, "k": args.k, "users": len(users), "processes": args.processes,
        "served": {"model_version": sample.model_version, "index_version": sample.index_version,
                   "items_returned": len(sample.items), "response_bytes": sample.ByteSize()},
        "settings": _settings_summary(settings), "configurations": {},
    }  # fmt: skip
    from tqdm import tqdm

    total = len(levels) * (2 if args.ceilings else 1)
    with tqdm(total=total, desc="bench", unit=" level", file=sys.stderr, disable=None) as bar:
        report["configurations"][args.label] = _run_levels(
            target, users, weights, levels, args, bar, label=args.label, metrics_url=metrics_url,
            triton_metrics=triton_metrics, server_pids=listening_pids(_port(target)),
            triton_pids=listening_pids(int(triton_port)), triton_model=settings.triton_model,
        )  # fmt: skip
        if args.ceilings:
            with _echo_server(sample.SerializeToString()) as (echo_target, echo_pid):
                report["configurations"]["echo"] = _run_levels(
                    echo_target, users, weights, levels, args, bar, label="echo", metrics_url=None,
                    triton_metrics=None, server_pids=[echo_pid], triton_pids=[], triton_model="",
                )  # fmt: skip
    if args.ceilings:
        from .ceilings import faiss_ceiling, triton_ceiling

        sys.stderr.write("ceilings: raw tritonclient on the served ranker, raw FAISS on the served index ...\n")
        triton = asyncio.run(triton_ceiling(settings, levels))
        report["ceilings"] = {
            "triton": [r.summary() for r in triton],
            "faiss": faiss_ceiling(settings, min(args.duration, 5.0)),
        }
    configurations = report["configurations"].items()
    report["best_at_p99_50ms"] = {name: best_at_p99(conf["levels"]) for name, conf in configurations}
    if args.ceilings:
        report["best_at_p99_50ms"]["triton_raw"] = best_at_p99(report["ceilings"]["triton"])
        report["fractions"] = _fractions(report, args.label)
    return report


def _run_levels(target: str, users: list[str], weights: list[float], levels: list[Level], args: argparse.Namespace,
                bar: Any, *, label: str, metrics_url: str | None, triton_metrics: str | None,
                server_pids: list[int], triton_pids: list[int], triton_model: str) -> dict[str, Any]:  # fmt: skip
    results = []
    with LoadGenerator(target, users, weights, processes=args.processes, k=args.k, deadline_s=args.deadline) as gen:
        cpu = CpuMeter({"server": server_pids, "triton": triton_pids, "client": gen.pids})
        for level in levels:
            bar.set_description(f"{label}: {level.label}")
            snaps: dict[str, tuple[MetricsSnapshot, MetricsSnapshot]] = {}

            def window(edge: str, snaps: dict[str, tuple[MetricsSnapshot, MetricsSnapshot]] = snaps) -> None:
                if edge == "start":
                    cpu.start()
                snaps[edge] = (scrape(metrics_url), scrape(triton_metrics))
                if edge == "end":
                    cpu.stop()

            result = gen.run(level, on_window=window)
            summary = result.summary()
            summary["cpu_cores"] = {k: round(v / result.elapsed_s, 3) for k, v in cpu.seconds.items()}
            if result.ok:
                summary["cpu_us_per_call"] = {k: round(v / result.ok * 1e6, 1) for k, v in cpu.seconds.items()}
            if "start" in snaps and "end" in snaps:
                mean = summary["latency_ms"]["mean"]
                summary["breakdown"] = breakdown(snaps["end"][0] - snaps["start"][0],
                                                 snaps["end"][1] - snaps["start"][1], mean, triton_model)  # fmt: skip
            summary["cdf"] = _thin(result.cdf())
            results.append(summary)
            bar.update(1)
            bar.write(_progress_line(label, level, result))
    return {"target": target, "levels": results}


def _progress_line(label: str, level: Level, r: LevelResult) -> str:
    p99 = r.percentile_ms(99)
    return (f"{label:>8} {level.label:>18}: {r.throughput:8.1f}/s  p50 {r.percentile_ms(50) or 0:7.2f} ms  "
            f"p99 {p99 or 0:7.2f} ms  failed {r.failed}  degraded {r.degraded}")  # fmt: skip


def _thin(points: list[tuple[float, float]], n: int = 200) -> list[tuple[float, float]]:
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


def best_at_p99(levels: Sequence[dict[str, Any]], bound_ms: float = P99_BOUND_MS) -> dict[str, Any] | None:
    """The level with the most answered calls/s whose p99 is within ``bound_ms`` and that failed nothing."""
    fit = [lv for lv in levels if lv["failed"] == 0 and lv["latency_ms"]["p99"] is not None
           and lv["latency_ms"]["p99"] <= bound_ms]  # fmt: skip
    if not fit:
        return None
    top = max(fit, key=lambda lv: lv["throughput_per_s"])
    return {"throughput_per_s": top["throughput_per_s"], "p99_ms": top["latency_ms"]["p99"], "mode": top["mode"],
            "value": top["value"]}  # fmt: skip


def _fractions(report: dict[str, Any], label: str) -> dict[str, float | None]:
    best = report["best_at_p99_50ms"]
    ours = (best.get(label) or {}).get("throughput_per_s")

    def frac(ceiling: float | None) -> float | None:
        return round(ours / ceiling, 3) if ours and ceiling else None

    faiss = report["ceilings"]["faiss"]
    return {
        "of_echo": frac((best.get("echo") or {}).get("throughput_per_s")),
        "of_triton_raw": frac((best.get("triton_raw") or {}).get("throughput_per_s")),
        "of_faiss_single_query": frac(faiss["single_query"]["rows_per_s"]),
        "of_faiss_batched": frac(faiss["batched"]["rows_per_s"]),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- the parts
def _users(settings: Settings, args: argparse.Namespace) -> tuple[list[str], list[float]]:
    if args.users_file is not None:
        from collections import Counter

        try:
            counts = Counter(line.strip() for line in args.users_file.read_text().splitlines() if line.strip())
        except OSError as exc:
            raise ConfigError(f"--users-file {args.users_file}: {exc.strerror or exc}") from exc
        if not counts:
            raise ConfigError(f"--users-file {args.users_file} holds no user ids")
        return list(counts), [float(n) for n in counts.values()]

    async def read() -> list[tuple[str, int]]:
        from recsvc.server.app import open_store

        store = await open_store(settings)
        try:
            return await store.active_users(args.users)
        finally:
            await store.close()

    active = asyncio.run(read())
    if not active:
        raise ConfigError("the history store holds no users to draw from: seed it (recsvc seed, recsvc up) "
                          "or give --users-file")  # fmt: skip
    return [u for u, _ in active], [float(n) for _, n in active]


def _sample_reply(target: str, user: str, k: int, deadline_s: float) -> Any:
    import grpc

    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    async def call() -> Any:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            return await stub.Recommend(pb.RecommendRequest(user_id=user, k=k), timeout=max(deadline_s, 10.0))

    try:
        return asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        raise ConfigError(f"no Recommend answer from {target}: {exc.code().name} {exc.details()} "
                          "(start a server with `make up`, or pass --start)") from None  # fmt: skip


def _port(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ConfigError(f"{what} exited with {proc.returncode} before it was ready; its log {log}:\n{tail}")
        time.sleep(0.1)
    raise ConfigError(f"{what} not ready within {timeout_s:.0f} s (log {log})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def _stack(settings: Settings, *, start: bool, log_dir: Path) -> Iterator[tuple[str, str | None]]:
    """(target, metrics url): a started server (and Triton if none answers), or the configured ones."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if not start:
        metrics = f"http://{host}:{settings.metrics_port}/metrics" if settings.metrics_port else None
        yield f"{host}:{settings.port}", metrics
        return
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if not _triton_ready(settings):
            log = log_dir / "triton.log"
            with log.open("wb") as fh:
                procs.append(subprocess.Popen([sys.executable, "-m", "recsvc.cli", "triton"], stdout=fh,
                                              stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
            deadline = time.monotonic() + 300
            while not _triton_ready(settings):
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"recsvc triton did not get ready; its log {log}")
                time.sleep(0.5)
        metrics_port = _free_port()
        port_file = log_dir / "server.port"
        port_file.unlink(missing_ok=True)
        log = log_dir / "server.log"
        env = {**os.environ, "RECSVC_METRICS_PORT": str(metrics_port)}
        with log.open("wb") as fh:
            # A fixed free port rather than 0: workers (RECSVC_WORKERS > 1) share one port.
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "recsvc.cli", "--log-format", "json", "serve", "--port", str(_free_port()),
                 "--port-file", str(port_file)], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            ))  # fmt: skip
        port = _wait_for(port_file, procs[-1], "recsvc serve", log)
        yield f"{host}:{port}", f"http://{host}:{metrics_port}/metrics"
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _triton_ready(settings: Settings) -> bool:
    from recsvc.ranking import TritonModels

    async def ask() -> bool:
        models = TritonModels.from_settings(settings, timeout_s=2.0)
        try:
            return await models.is_server_ready()
        finally:
            await models.close()

    return asyncio.run(ask())


@contextlib.contextmanager
def _echo_server(reply: bytes) -> Iterator[tuple[str, int]]:
    with tempfile.TemporaryDirectory(prefix="recsvc-echo-") as tmp:
        reply_file, port_file, log = Path(tmp) / "reply.bin", Path(tmp) / "port", Path(tmp) / "echo.log"
        reply_file.write_bytes(reply)
        with log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "recsvc.offline.bench.echo", "--reply", str(reply_file),
                                     "--port-file", str(port_file)], stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            port = _wait_for(port_file, proc, "the echo server", log, 60)
            yield f"127.0.0.1:{port}", proc.pid
        finally:
            _stop(proc)


def machine() -> dict[str, Any]:
    """Where the run happened."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform(),
            "git_commit": _git_commit()}  # fmt: skip


def _git_commit() -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or None  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return None


def _settings_summary(settings: Settings) -> dict[str, Any]:
    keep = ("workers", "num_candidates", "history_store", "l1_policy", "l1_max_entries", "max_batch",
            "index_kind", "index_device", "max_in_flight")  # fmt: skip
    return {k: _jsonable(getattr(settings, k)) for k in keep}


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, int | float | str | bool) or v is None else str(v)


# ------------------------------------------------------------------------------------------ output
def format_table(report: dict[str, Any]) -> str:
    """The report as Markdown tables: one row per configuration and level, then the summary."""
    lines = ["| configuration | level | calls/s | p50 ms | p99 ms | p99.9 ms | failed | degraded | "
             "server CPU us/call | stages ms (history / query / retrieve / rank / respond) | overhead ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, conf in report["configurations"].items():
        for lv in conf["levels"]:
            lat, b = lv["latency_ms"], lv.get("breakdown") or {}
            stages = " / ".join(_fmt(v) for v in (b.get("stages_ms") or {}).values()) or ""
            level = f"{lv['value']:g} in flight" if lv["mode"] == "closed" else f"{lv['value']:g}/s offered"
            cpu = (lv.get("cpu_us_per_call") or {}).get("server")
            lines.append(f"| {name} | {level} | {lv['throughput_per_s']:,.1f} | {_fmt(lat['p50'])} "
                         f"| {_fmt(lat['p99'])} | {_fmt(lat['p99_9'])} | {lv['failed']} | {lv['degraded']} "
                         f"| {_fmt(cpu)} | {stages} | {_fmt(b.get('overhead_ms'))} |")  # fmt: skip
    for lv in (report.get("ceilings") or {}).get("triton", []):
        lat = lv["latency_ms"]
        lines.append(f"| triton_raw | {lv['value']:g} in flight | {lv['throughput_per_s']:,.1f} | {_fmt(lat['p50'])} "
                     f"| {_fmt(lat['p99'])} | {_fmt(lat['p99_9'])} | {lv['failed']} | | | | |")  # fmt: skip
    lines += ["", f"best throughput at p99 <= {P99_BOUND_MS:g} ms:"]
    for name, best in report["best_at_p99_50ms"].items():
        lines.append(f"  {name}: " + ("none within the bound" if best is None else
                                      f"{best['throughput_per_s']:,.1f}/s (p99 {best['p99_ms']:.2f} ms)"))  # fmt: skip
    if "ceilings" in report:
        f = report["ceilings"]["faiss"]
        lines.append(f"  faiss_raw ({f['items']:,} items, k {f['k']}): one query per call "
                     f"{f['single_query']['rows_per_s']:,.1f}/s, batches of {f['batched']['batch']} "
                     f"{f['batched']['rows_per_s']:,.1f} rows/s")  # fmt: skip
        lines.append("fractions: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["fractions"].items()))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
