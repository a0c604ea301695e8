"""Rolling a published version out (and back) with Triton in EXPLICIT model-control mode.

Who serves what is one small file beside the versions, ``<model>/serving.json``::

    {"version": 7, "previous": 6, "loaded": [6, 7], "refused": [5], "updated_at": "..."}

* ``version``: what every recsvc replica serves (they poll this file and switch when it changes);
* ``loaded``: the versions Triton must have loaded. The rollout widens it before a switch and narrows it
  after the drain; a replica that finds its version gone from Triton (a restart) re-loads exactly this
  set, so it can never unload a version another replica still uses;
* ``refused``: versions that failed their rollout, for people and tools.

It is replaced atomically (write, fsync, rename), and rollouts are serialised by a lock file.

A rollout to version N:

1. ``loaded = [current, N]``, then Triton loads that set (the current version keeps serving meanwhile);
2. wait until Triton reports N ready (its model_warmup has run by then);
3. canary: real inputs (the bundle's samples.npz) through Triton's N must match ONNX Runtime on the same
   model.onnx here: right shape, finite, padding scored PADDING_SCORE, same ranking (Spearman >= 0.95,
   loose enough for FP16/INT8 engines, tight enough to catch a wrong model or a broken backend);
4. ``version = N``: replicas switch within their poll interval;
5. after ``drain_s`` (replicas switched and their last requests on the old version finished),
   ``loaded = [N]`` and Triton unloads the old version.

Any failure before step 4 unloads N again, records it in ``refused`` and leaves the current version
serving. A rollback is a rollout to ``previous`` (or a version given explicitly).

Before Triton is asked to load anything (a rollout's pre-flight, a replica re-pinning after a Triton
restart, ``triton-sync``), every version of the set is checked against its bundle's checksums
(``verify_version``); a damaged one is never handed to Triton. That hashes each version's files (sha256,
measured at 0.66 ms per MiB on one core of the 2-core test machine): 0.4 ms for the test bundle, a few ms
for MovieLens, about 0.3 s per version for a 1M-item catalog (256 MiB of 64-d embeddings plus its index).
It runs in a worker thread, never on the event loop, and only when Triton must (re)load something: a
rollout, a replica finding its version gone (a Triton restart), triton-sync seeing a different set.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import orjson

from recsvc.bundle import PADDING_SCORE, read_manifest
from recsvc.durable import replace_file
from recsvc.errors import BundleError, ConfigError, RankerUnavailable, RecsvcError
from recsvc.repository.publishing import list_versions, verify_version, version_dir

__all__ = [
    "SERVING_FILE",
    "ModelAdmin",
    "RolloutError",
    "ServingState",
    "canary_inputs",
    "fitted_config",
    "pinnable_versions",
    "read_serving",
    "reconcile",
    "rollout",
    "rollout_lock",
    "write_serving",
]

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"
_CANARY_ROWS = 8
_MIN_SPEARMAN = 0.95


class RolloutError(RecsvcError):
    """A version was refused; the serving version did not change."""


@dataclass(frozen=True)
class ServingState:
    """Contents of serving.json."""

    version: int
    loaded: tuple[int, ...]
    previous: int | None = None
    refused: tuple[int, ...] = ()
    updated_at: str = ""

    def with_(self, **changes: object) -> ServingState:
        """A copy with ``changes`` and a fresh timestamp."""
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        return replace(self, **changes, updated_at=stamp)  # type: ignore[arg-type]


class ModelAdmin(Protocol):
    """The model server as the rollout drives it (TritonRanker in production)."""

    async def loaded_versions(self) -> set[int]:
        """Versions of the model loaded and ready now."""
        ...

    async def is_server_ready(self) -> bool:
        """Whether the model server answers at all."""
        ...

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        """Make exactly ``versions`` loaded."""
        ...

    async def is_model_ready(self, version: str = "") -> bool:
        """Whether ``version`` is loaded and ready."""
        ...

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        """SCORES from ``version``."""
        ...


def read_serving(repository: Path, model: str) -> ServingState | None:
    """The serving state, or None before the first rollout."""
    path = repository / model / SERVING_FILE
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from exc
    try:
        return ServingState(version=int(raw["version"]), loaded=tuple(int(v) for v in raw["loaded"]),
                            previous=None if raw.get("previous") is None else int(raw["previous"]),
                            refused=tuple(int(v) for v in raw.get("refused", ())),
                            updated_at=str(raw.get("updated_at", "")))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is malformed: {exc}") from exc


def write_serving(repository: Path, model: str, state: ServingState) -> None:
    """Replace serving.json atomically and durably."""
    replace_file(repository / model / SERVING_FILE, orjson.dumps(asdict(state), option=orjson.OPT_INDENT_2))


@contextlib.contextmanager
def rollout_lock(repository: Path, model: str) -> Iterator[None]:
    """One rollout at a time per model (a dot-file: Triton ignores it)."""
    directory = repository / model
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".rollout.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def canary_inputs(bundle: Path) -> dict[str, npt.NDArray[np.int64]]:
    """Known inputs: the first rows of samples.npz (real histories and candidates), plus padding."""
    manifest = read_manifest(bundle)
    path = bundle / "samples.npz"
    if path.is_file():
        with np.load(path) as samples:
            history = np.asarray(samples["HISTORY"][:_CANARY_ROWS], dtype=np.int64)
            candidates = np.asarray(samples["CANDIDATES"][:_CANARY_ROWS], dtype=np.int64).copy()
    else:
        # An older bundle without samples: deterministic in-range ids still exercise the whole model.
        rng = np.random.default_rng(0)
        n = min(manifest.num_items, int(manifest.extra.get("model_items", manifest.num_items)))
        history = rng.integers(0, n, (_CANARY_ROWS, manifest.history_len)).astype(np.int64)
        candidates = rng.integers(0, n, (_CANARY_ROWS, manifest.num_candidates)).astype(np.int64)
    candidates[-1, candidates.shape[1] // 2 :] = -1     # padded slots must come back as PADDING_SCORE
    return {"HISTORY": history, "CANDIDATES": candidates}


def _reference_scores(model_onnx: Path, inputs: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_onnx), options, providers=["CPUExecutionProvider"])
    out = session.run(["SCORES"], inputs)[0]
    return np.asarray(out, dtype=np.float32)


def _spearman(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() and rb.std() else float(np.array_equal(ra, rb))


def check_canary(
    got: npt.NDArray[np.float32], expected: npt.NDArray[np.float32], candidates: npt.NDArray[np.int64]
) -> None:
    """Raise RolloutError unless Triton's scores are what the model should give (see the module doc)."""
    for what, scores in (("SCORES", got), ("the reference's SCORES", expected)):
        if scores.shape != candidates.shape:
            raise RolloutError(f"canary: {what} shape {scores.shape}, expected {candidates.shape}")
    if not np.isfinite(got).all():
        raise RolloutError("canary: SCORES has NaN or infinite values")
    padded = candidates < 0
    if not np.allclose(got[padded], PADDING_SCORE):
        raise RolloutError("canary: padded candidates were not scored PADDING_SCORE")
    for row in range(len(got)):
        real = ~padded[row]
        rho = _spearman(got[row, real], expected[row, real])
        if rho < _MIN_SPEARMAN:
            raise RolloutError(f"canary: row {row} ranks differently from the reference (Spearman {rho:.3f})")


async def _reachable(admin: ModelAdmin) -> bool:
    try:
        return await admin.is_server_ready()
    except RankerUnavailable:
        return False


def fitted_config(repository: Path, model: str, version: int) -> str:
    """The model's config.pbtxt with warm-up shaped like ``version``'s bundle (Triton refuses a misfit)."""
    from recsvc.repository.publishing import fit_warmup

    text = (repository / model / "config.pbtxt").read_text(encoding="utf-8")
    return fit_warmup(text, read_manifest(version_dir(repository, model, version) / "bundle"))


def pinnable_versions(repository: Path, model: str, versions: Sequence[int]) -> list[int]:
    """The versions of ``versions`` whose files match their bundle's checksums (blocking: hashes them).

    A damaged version is logged and left out rather than handed to Triton: it would load (a model file
    with 4 KiB overwritten can still be a valid ONNX graph) and serve wrong or NaN scores.
    """
    good = []
    for version in versions:
        try:
            verify_version(version_dir(repository, model, version))
        except BundleError as exc:
            log.error("not loading %s version %d into Triton: %s", model, version, exc)
            continue
        good.append(version)
    return good


async def reconcile(repository: Path, model: str, admin: ModelAdmin) -> bool:
    """Make one Triton hold exactly serving.json's ``loaded`` set; True if it had to (un)load.

    For Triton replicas the rollout never talks to (several behind one Service): a sidecar per replica
    runs this in a loop (``recsvc triton-sync``), so every replica follows the same rollout, including
    unloading what a drain released. Before the first rollout it loads the newest version.
    """
    state = read_serving(repository, model)
    if state is None:
        versions = list_versions(repository, model)
        if not versions:
            return False
        state = ServingState(version=versions[-1], loaded=(versions[-1],))
    if await admin.loaded_versions() == set(state.loaded):
        return False
    versions = await asyncio.to_thread(pinnable_versions, repository, model, state.loaded)
    if not versions:
        raise BundleError(f"every version {model} should hold ({list(state.loaded)}) is damaged; loading none")
    if await admin.loaded_versions() == set(versions):
        return False        # holds every intact version already; the damaged one stays out
    await admin.load_versions(versions, fitted_config(repository, model, state.version))
    log.info("triton now holds %s versions %s", model, versions)
    return True


@dataclass
class RolloutReport:
    """What a rollout did, step by step (seconds since its start)."""

    version: int
    previous: int | None
    steps: list[tuple[str, float]] = field(default_factory=list)


async def rollout(
    repository: Path, model: str, version: int, admin: ModelAdmin, *,
    drain_s: float = 30.0, ready_timeout_s: float = 120.0,
) -> RolloutReport:  # fmt: skip
    """Roll ``version`` out (see the module doc); call under ``rollout_lock``. Raises RolloutError if refused."""
    if version not in list_versions(repository, model):
        raise ConfigError(f"{model} has no complete version {version} in {repository}")
    start = time.perf_counter()
    report = RolloutReport(version, None)

    def step(name: str) -> None:
        report.steps.append((name, round(time.perf_counter() - start, 3)))
        log.info("rollout of %s version %d: %s", model, version, name)

    state = read_serving(repository, model)
    config = fitted_config(repository, model, version)
    if state is None:
        # Before the first rollout replicas serve the newest version: the one before this, if any.
        older = [v for v in list_versions(repository, model) if v < version]
        if older:
            state = ServingState(version=older[-1], loaded=(older[-1],))
    current = state.version if state is not None else None
    report.previous = current
    if current == version:
        step("already serving")
        return report
    if not await admin.is_server_ready():
        # Not the version's fault: nothing is refused, and `recsvc rollout N` finishes the job later.
        raise ConfigError(f"Triton is not reachable: version {version} is published but not rolled out; "
                          f"run `recsvc rollout {version}` once Triton is up")  # fmt: skip
    keep = () if current is None else (current,)
    base = state or ServingState(version=version, loaded=())
    try:
        # Pre-flight, before Triton sees the version: the model must run here and give sane SCORES.
        # (A version that fails inside Triton can take Triton down with it: 2.51 sometimes crashes while
        # tearing down a python-backend model whose warm-up failed.)
        # Files first: a model.onnx damaged after publishing may still load and pass a loose canary.
        await asyncio.to_thread(verify_version, version_dir(repository, model, version))
        bundle = version_dir(repository, model, version) / "bundle"
        inputs = canary_inputs(bundle)
        expected = await asyncio.to_thread(_reference_scores, version_dir(repository, model, version) / "model.onnx",
                                           inputs)  # fmt: skip
        check_canary(expected, expected, inputs["CANDIDATES"])
        step("pre-flight passed (ONNX Runtime here)")
    except (RolloutError, BundleError, OSError, ValueError, RuntimeError) as exc:
        if state is not None:
            write_serving(repository, model, state.with_(refused=(*state.refused, version)))
        raise RolloutError(f"version {version} refused before loading, {current} keeps serving: {exc}") from exc
    write_serving(repository, model, base.with_(loaded=(*keep, version)))
    try:
        await admin.load_versions([*keep, version], config)
        step("loaded beside the current version")
        deadline = time.monotonic() + ready_timeout_s
        while not await admin.is_model_ready(str(version)):
            if time.monotonic() > deadline:
                raise RolloutError(f"version {version} not ready within {ready_timeout_s:.0f} s")
            await asyncio.sleep(0.2)
        step("ready")
        got = await admin.score(inputs["HISTORY"], inputs["CANDIDATES"], version=str(version))
        check_canary(got, expected, inputs["CANDIDATES"])
        step("canary passed")
    except (RolloutError, RankerUnavailable, BundleError, OSError) as exc:
        if isinstance(exc, RankerUnavailable) and not await _reachable(admin):
            # Triton went away mid-rollout: not the version's fault. Nothing is refused or switched.
            if state is not None:
                write_serving(repository, model, state.with_())
            raise ConfigError(f"Triton became unreachable during the rollout of version {version} ({exc}); "
                              f"{current} still serves; run `recsvc rollout {version}` again") from exc
        # Back to exactly what served before; the current version never stopped serving.
        if state is not None:
            refused = (*state.refused, version)
            write_serving(repository, model, state.with_(refused=refused))
            with contextlib.suppress(RankerUnavailable):
                await admin.load_versions(list(state.loaded), fitted_config(repository, model, state.version))
        raise RolloutError(f"version {version} refused, {current} keeps serving: {exc}") from exc
    switched = ServingState(version=version, loaded=(*keep, version), previous=current,
                            refused=state.refused if state else ())  # fmt: skip
    write_serving(repository, model, switched.with_())
    step("switched: replicas follow within their poll interval")
    if keep:
        await asyncio.sleep(drain_s)
        write_serving(repository, model, switched.with_(loaded=(version,)))
        await admin.load_versions([version], config)
        step(f"version {current} unloaded after a {drain_s:.0f} s drain")
    return report
