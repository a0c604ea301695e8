"""Run the tritonserver binary that nvidia-pytriton bundles, as a managed subprocess.

The bundled server has only the python backend, whose stub embeds a CPython of the same minor version
as ours. The stub ignores ``PYTHONPATH`` (and the other ``PYTHON*`` variables); it finds its packages the way
any embedded CPython does, by looking for ``python3`` on ``PATH`` and reading the ``pyvenv.cfg`` next to
it. So the server gets our interpreter's ``bin`` directory first on ``PATH`` and our interpreter's
``libpython`` first on ``LD_LIBRARY_PATH``: the stub then runs the same CPython build with this
environment's numpy and onnxruntime.

Readiness is polled over Triton's HTTP health endpoint with urllib, so this module needs no tritonclient.

``SupervisedTriton`` (what ``recsvc triton`` and ``recsvc up`` run) restarts tritonserver when it dies
(a crash, an abort in its python backend, kill -9): after ``restart_min_s``, doubling with every death
that follows a short run up to ``restart_max_s``, and back to ``restart_min_s`` once a run has lasted
``restart_stable_s``. Each death is logged with its exit status and the log's error lines. SIGTERM or
SIGINT is forwarded (tritonserver drains, then exits) and nothing is restarted after it. In EXPLICIT mode
a restarted Triton holds only the start-up models; recsvc notices the version it serves is gone and loads
it again (recsvc/versions.py), after checking its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import filecmp
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from recsvc.config import Settings
from recsvc.errors import ConfigError, RankerUnavailable
from recsvc.tasks import cancel_and_wait

__all__ = [
    "SupervisedTriton",
    "TritonDistribution",
    "TritonOptions",
    "TritonServer",
    "find_tritonserver",
    "options_from_settings",
    "serve_triton",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_STUB = "triton_python_backend_stub"
_LOG_TAIL_BYTES = 4000
# Triton's glog error lines ("E1124 20:34:35.466921 6678 model_lifecycle.cc:642] ...") and its final
# "error: creating server: ..." line.
_ERROR_LINE = re.compile(r"^(E\d{4} |error: )")
# Error lines every start on a machine without a GPU writes; they never explain a failure.
_HARMLESS = ("CudaDriverHelper has not been initialized",)


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the bundled Triton live."""

    binary: Path
    backends: Path
    caches: Path
    libs: Path
    stubs: Path

    def stub_for(self, version: tuple[int, int]) -> Path:
        """Return the python-backend stub built for CPython ``major.minor``."""
        return self.stubs / f"{version[0]}.{version[1]}" / _STUB


def find_tritonserver() -> TritonDistribution:
    """Locate nvidia-pytriton's tritonserver without importing pytriton (which pulls in much more)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("tritonserver not found: install nvidia-pytriton (it bundles the server binary)")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    dist = TritonDistribution(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        caches=root / "caches",
        libs=package.parent / "nvidia_pytriton.libs",
        stubs=root / "python_backend_stubs",
    )
    if not os.access(dist.binary, os.X_OK):
        raise ConfigError(f"nvidia-pytriton is installed but {dist.binary} is missing or not executable")
    if not (dist.backends / "python").is_dir():
        raise ConfigError(f"nvidia-pytriton at {package} has no python backend in {dist.backends}")
    return dist


def install_stub(dist: TritonDistribution, version: tuple[int, int] | None = None) -> Path:
    """Put the stub for our CPython into backends/python (pytriton ships one per version, unplaced)."""
    version = version or (sys.version_info.major, sys.version_info.minor)
    source = dist.stub_for(version)
    if not source.is_file():
        raise ConfigError(f"nvidia-pytriton has no python-backend stub for Python {version[0]}.{version[1]}")
    target = dist.backends / "python" / _STUB
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return target
    tmp = target.with_name(f".{_STUB}.{os.getpid()}")
    try:
        shutil.copy2(source, tmp)
        tmp.replace(target)  # atomic: a concurrently starting server never execs half a binary
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot install the python-backend stub into {target}: {exc}") from exc
    return target


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    """How to run tritonserver. Ports must be free; 127.0.0.1 keeps the server private to the host."""

    model_repository: Path
    log_path: Path
    models: tuple[str, ...] = ("ranker",)  # loaded at start (explicit model control); may be empty
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    startup_timeout_s: float = 120.0
    exit_timeout_s: float = 5.0  # Triton's own drain time for in-flight requests on SIGTERM
    # SupervisedTriton: wait before restarting a server that died, doubling per death after a short run
    # (one shorter than restart_stable_s), never longer than restart_max_s.
    restart_min_s: float = 1.0
    restart_max_s: float = 30.0
    restart_stable_s: float = 60.0
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to (and overriding) the computed env


def options_from_settings(
    settings: Settings, *, log_path: Path | None = None, models: tuple[str, ...] | None = None
) -> TritonOptions:
    """Options matching the settings the service uses to reach Triton (``triton_url`` and friends)."""
    host, _, port = settings.triton_url.rpartition(":")
    try:
        grpc_port = int(port)
    except ValueError as exc:
        raise ConfigError(f"setting 'triton_url' must be host:port, got {settings.triton_url!r}") from exc
    return TritonOptions(
        model_repository=settings.model_repository,
        log_path=log_path if log_path is not None else settings.data_dir / "tritonserver.log",
        models=models if models is not None else (settings.triton_model,),
        host=host or "127.0.0.1",
        grpc_port=grpc_port,
        http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port,
        exit_timeout_s=settings.grace_s,
    )


class TritonServer:
    """A tritonserver subprocess: ``await start()`` returns once it is ready, ``await stop()`` ends it.

    Use as ``async with TritonServer(options) as server: ...``. Output goes to ``options.log_path``
    (appended), never to a pipe that could fill and stall the server. The process runs in its own
    session so a terminal's Ctrl-C reaches only us (we then stop it gracefully) and, on Linux, it is
    sent SIGTERM if this process dies without stopping it.
    """

    def __init__(self, options: TritonOptions, *, distribution: TritonDistribution | None = None) -> None:
        self.options = options
        self._dist = distribution
        self._process: asyncio.subprocess.Process | None = None
        self._log_file: IO[bytes] | None = None
        self._log_start = 0

    # --- addresses ---
    @property
    def grpc_url(self) -> str:
        """host:port for tritonclient.grpc (what ``Settings.triton_url`` holds)."""
        return f"{self._client_host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint (health, metadata)."""
        return f"http://{self._client_host}:{self.options.http_port}"

    @property
    def _client_host(self) -> str:
        host = self.options.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host  # a wildcard bind is reached on loopback

    @property
    def pid(self) -> int | None:
        """Process id while started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended (negative: killed by that signal)."""
        return self._process.returncode if self._process is not None else None

    # --- command line ---
    def command(self) -> list[str]:
        """Return the tritonserver argv."""
        dist = self._distribution()
        o = self.options
        args = [
            str(dist.binary),
            f"--model-repository={o.model_repository.resolve()}",
            f"--backend-directory={dist.backends}",
            f"--cache-directory={dist.caches}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in o.models),
            # A model that fails to load at start fails the start, instead of a server that is up but useless.
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Configs are complete; auto-complete would start an extra python stub per model just to ask it.
            "--disable-auto-complete-config",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            f"--exit-timeout-secs={max(1, round(o.exit_timeout_s))}",
            "--log-verbose=0",
            *o.extra_args,
        ]
        return args

    def environment(self) -> dict[str, str]:
        """Environment for the server and, through it, the python stubs."""
        dist = self._distribution()
        env = dict(os.environ)
        python_bin = str(Path(sys.executable).parent)
        if not (Path(python_bin) / "python3").exists():
            log.warning("no python3 next to %s: the python stub may not find this environment's packages", python_bin)
        rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != python_bin]
        env["PATH"] = os.pathsep.join([python_bin, *rest])
        libs = [str(dist.libs)]
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        system = str(libdir).startswith(("/usr/lib", "/lib"))  # searched anyway; keep the bundled libs first
        if libdir and soname and not system and (Path(libdir) / str(soname)).exists():
            # Our shared libpython first, so the stub embeds exactly our CPython, not a system one.
            libs.insert(0, str(libdir))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        # numpy's OpenBLAS would otherwise start a spinning thread per core in every stub; ORT's own
        # pool is sized by the model config.
        env["OPENBLAS_NUM_THREADS"] = "1"
        env["OMP_NUM_THREADS"] = "1"
        env.update(self.options.env)
        return env

    def _distribution(self) -> TritonDistribution:
        if self._dist is None:
            self._dist = find_tritonserver()
        return self._dist

    # --- lifecycle ---
    async def start(self) -> None:
        """Launch and wait until ``/v2/health/ready`` says ready (all start-up models loaded).

        Raises ConfigError for problems found before launching, RankerUnavailable (with the log's error
        lines) when the server exits during start-up or is not ready within the timeout; either way no
        process is left running.
        """
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError("tritonserver is already running")
        o = self.options
        if not o.model_repository.is_dir():
            raise ConfigError(f"model repository {o.model_repository} does not exist")
        install_stub(self._distribution())
        argv, env = self.command(), self.environment()
        o.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = o.log_path.open("ab")
        self._log_start = self._log_file.tell()
        log.info("starting tritonserver (grpc %s, log %s)", self.grpc_url, o.log_path)
        started = time.monotonic()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            await self.stop()  # closes the log file
            raise ConfigError(f"cannot run {argv[0]}: {exc}") from exc
        try:
            await self._wait_ready(started + o.startup_timeout_s)
        except BaseException:
            await self.stop(grace_s=2.0)
            raise
        log.info("tritonserver ready in %.1f s (pid %d)", time.monotonic() - started, self._process.pid)

    async def _wait_ready(self, deadline: float) -> None:
        process = self._process
        assert process is not None
        url = f"{self.http_url}/v2/health/ready"
        # Waiting on the exit alongside the polls wakes us at once if the server dies during start-up.
        exited = asyncio.ensure_future(process.wait())
        try:
            while True:
                if exited.done():
                    errors = await asyncio.to_thread(self.log_errors)   # up to 1 MiB: off the loop
                    raise RankerUnavailable(
                        f"tritonserver exited with status {process.returncode} during start-up "
                        f"(log: {self.options.log_path}):\n{errors}"
                    )
                if await asyncio.to_thread(_http_ok, url):
                    return
                if time.monotonic() > deadline:
                    errors = await asyncio.to_thread(self.log_errors)
                    raise RankerUnavailable(
                        f"tritonserver not ready after {self.options.startup_timeout_s:.0f} s "
                        f"(log: {self.options.log_path}):\n{errors}"
                    )
                await asyncio.wait({exited}, timeout=0.1)
        finally:
            exited.cancel()

    async def wait(self) -> int:
        """Wait for the process to exit on its own; return its status."""
        if self._process is None:
            raise RuntimeError("tritonserver was not started")
        return await self._process.wait()

    async def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s`` (default: exit_timeout_s + 2); return the exit status."""
        process, self._process = self._process, None
        try:
            if process is None:
                return None
            if process.returncode is None:
                grace = self.options.exit_timeout_s + 2.0 if grace_s is None else grace_s
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout=grace)
                except TimeoutError:
                    log.warning("tritonserver did not exit within %.1f s of SIGTERM; killing it", grace)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            # Its python backend stubs share its process group (start_new_session made it the leader).
            # After a server that died by itself (kill -9, an abort) they can outlive it, holding memory
            # and shared-memory regions: whatever is left of the group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            log.info("tritonserver exited with status %s", process.returncode)
            return process.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """Return the end of what this run of the server has written to its log."""
        try:
            with self.options.log_path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self._log_start, size - max_bytes))
                return fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read {self.options.log_path}: {exc})"

    def log_errors(self, max_lines: int = 20, *, tail_lines: int | None = None) -> str:
        """Return this run's error lines (Triton's ``E...`` lines and ``error:``), else the log's tail.

        Triton ends a failed start with a wide status table, so the plain tail rarely shows the cause.
        ``tail_lines`` shortens the fallback to that many lines (a server killed by a signal writes no error).
        """
        lines = self.log_tail(max_bytes=1 << 20).splitlines()
        errors = [line for line in lines if _ERROR_LINE.match(line) and not any(n in line for n in _HARMLESS)]
        if errors:
            return "\n".join(errors[-max_lines:])
        return "\n".join(lines[-tail_lines:]) if tail_lines else self.log_tail()

    async def __aenter__(self) -> TritonServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def restart_delay(options: TritonOptions, quick_deaths: int) -> float:
    """Seconds to wait before restart number ``quick_deaths`` (1, 2, ...) of a run of short-lived servers."""
    exponent = min(max(quick_deaths - 1, 0), 30)     # 2**30 s is past any maximum: no float overflow
    return float(min(options.restart_min_s * 2.0**exponent, options.restart_max_s))


class SupervisedTriton:
    """A TritonServer that is started again whenever it dies, until ``stop()``.

    ``await start()`` returns once the first server is ready (a first start that fails raises, as
    TritonServer's does: a config error is not fixed by restarting). Then a supervising task owns the
    server: on an exit nobody asked for it logs, waits (see ``restart_delay``) and starts a new one; a
    restart that fails counts as another quick death. ``await stop()`` ends the task and then the server
    (SIGTERM, Triton's drain, SIGKILL after the grace). ``clock`` is injectable for tests.
    """

    def __init__(self, options: TritonOptions, *, distribution: TritonDistribution | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.options = options
        self.server = TritonServer(options, distribution=distribution)
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0               # servers started after a death
        self.deaths: list[int] = []     # exit status of every server that died by itself
        self.restarted = asyncio.Event()   # set after each successful restart (tests, ``recsvc up``)

    @property
    def pid(self) -> int | None:
        """The running server's process id."""
        return self.server.pid

    async def start(self) -> None:
        """Start the first server and supervise it from then on."""
        await self.server.start()
        self._task = asyncio.create_task(self._supervise(self._clock()), name="triton-supervisor")

    async def _supervise(self, started: float) -> None:
        quick_deaths = 0
        while True:
            status = await self.server.wait()
            ran = self._clock() - started
            self.deaths.append(status)
            quick_deaths = 1 if ran >= self.options.restart_stable_s else quick_deaths + 1
            what = f"tritonserver (pid {self.server.pid}, up {ran:.1f} s) exited by itself with status {status}"
            # Up to 1 MiB of log read and scanned: in a thread, not on the loop `recsvc up` also serves on.
            errors = await asyncio.to_thread(self.server.log_errors, max_lines=10, tail_lines=5)
            while True:
                delay = restart_delay(self.options, quick_deaths)
                log.error("%s; restarting it in %.1f s (restart %d). Its log (%s) ends with:\n%s",
                          what, delay, self.restarts + 1, self.options.log_path, errors)  # fmt: skip
                await self.server.stop()      # reaps the dead process and closes its log file
                await asyncio.sleep(delay)
                started = self._clock()
                try:
                    await self.server.start()
                except (RankerUnavailable, ConfigError, OSError) as exc:
                    # Died during start-up (or never came up), or could not be launched right now (a full
                    # disk for its log, too many open files): another quick death, a longer wait. Giving up
                    # would leave no Triton at all until someone restarts `recsvc triton`.
                    quick_deaths += 1
                    what, errors = "restarting tritonserver failed", str(exc)
                    continue
                break
            self.restarts += 1
            log.warning("tritonserver restarted (pid %s, restart %d); recsvc loads its versions again",
                        self.server.pid, self.restarts)  # fmt: skip
            self.restarted.set()

    async def wait(self) -> None:
        """Wait until the supervisor ends (only by an error of its own: deaths are restarted)."""
        if self._task is None:
            raise RuntimeError("SupervisedTriton was not started")
        await self._task

    async def stop(self, grace_s: float | None = None) -> int | None:
        """Stop supervising (no restart from now on), then stop the server; return its exit status."""
        await cancel_and_wait(self._task)
        self._task = None
        return await self.server.stop(grace_s)

    async def __aenter__(self) -> SupervisedTriton:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve_triton(options: TritonOptions, *, restart: bool = True) -> int:
    """Run tritonserver until SIGTERM/SIGINT, restarting it whenever it dies (see ``SupervisedTriton``).

    For ``recsvc triton``: ``return asyncio.run(serve_triton(options_from_settings(settings)))``.
    Returns 0 after a requested stop. With ``restart=False`` it returns when the server exits by itself,
    with the server's exit status (1 if it was killed by a signal).
    """
    supervised = SupervisedTriton(options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        if restart:
            await _until(stop, supervised.start())
            if stop.is_set():
                await supervised.stop()
                return 0
            await _until(stop, supervised.wait())
            log.info("stopping tritonserver")
            await supervised.stop()
            return 0
        server = supervised.server
        await _until(stop, server.start())
        if stop.is_set():
            await server.stop()
            return 0
        status = await _until(stop, server.wait())
        if status is not None:
            log.error("tritonserver exited by itself with status %d; log ends with:\n%s", status, server.log_tail())
            await server.stop()
            return status if status > 0 else 1
        log.info("stopping tritonserver")
        await server.stop()
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, _T]) -> _T | None:
    """Run ``work`` until it finishes (its result) or ``stop`` is set (it is cancelled: None)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    await cancel_and_wait(task)
    return None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _die_with_parent() -> Callable[[], None] | None:
    """Return a preexec_fn asking Linux to SIGTERM the child when we die (no orphans holding ports)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        # Resolved before fork: the child only makes the system call.
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec
