"""Hot swap: follow the model repository and switch the service to the version it should serve.

Which version: the one ``serving.json`` names (written by ``recsvc publish``/``rollback`` after the
version passed its canary; see repository/rollout.py), or, before any rollout, the newest published one.
The follower also keeps its version pinned in Triton: when Triton restarts (EXPLICIT mode comes back
with nothing loaded) or the version disappears, it loads the rollout's ``loaded`` set again.

A published version is a ranker version plus the bundle (catalog, embeddings, item index) it belongs
with, so one switch changes both. The switch:

1. loads the new bundle beside the current one (index built or read, off the event loop), after checking
   its files against the bundle's checksums; a version that fails to load, for whatever reason, is logged
   once with its traceback, refused for a back-off period that doubles with each failure (so a broken
   version is not reloaded at every poll, yet a half-synced copy heals) and everything it opened is
   closed; the current one keeps serving;
2. makes sure Triton has the new ranker version ready (EXPLICIT mode: it asks Triton to load it);
   if Triton cannot (down, restarting, still loading), the new bundle is kept loaded and the switch is
   tried again at the next poll with it: a Triton outage must not turn into loading (hashing, ONNX
   Runtime, index) the same bundle every few seconds. It is closed only when the repository moves on
   to another version, or when the follower closes;
3. swaps the pipeline's bundle reference: requests that start afterwards use the new version, requests
   in flight finish on the one they started with;
4. closes the old bundle once its last request has finished (or after a bounded wait).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Protocol

from recsvc.config import Settings
from recsvc.errors import BundleError, RankerUnavailable, RecsvcError
from recsvc.pipeline import Pipeline, ServingBundle, load_serving_bundle
from recsvc.repository import latest_version
from recsvc.repository.rollout import ServingState, fitted_config, pinnable_versions, read_serving
from recsvc.tasks import cancel_and_wait

__all__ = ["ModelControl", "VersionFollower"]

log = logging.getLogger(__name__)


class ModelControl(Protocol):
    """What the follower needs from the model server (TritonModels in production)."""

    async def is_model_ready(self, version: str = "") -> bool:
        """Whether ``version`` of the ranker is loaded and ready."""
        ...

    async def load_model(self, name: str | None = None) -> None:
        """Ask the model server to (re)load the ranker's versions (per the config's version policy)."""
        ...

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        """Make exactly ``versions`` loaded."""
        ...


Loader = Callable[[Path, str, Settings], ServingBundle]
# A version that failed to load is tried again after this, doubling per failure up to the maximum.
_RETRY_FAILED_S = 30.0
_RETRY_FAILED_MAX_S = 600.0


class VersionFollower:
    """Polls the repository every ``repository_poll_s`` and switches to its newest version."""

    def __init__(self, pipeline: Pipeline, models: ModelControl, settings: Settings,
                 loader: Loader = load_serving_bundle) -> None:  # fmt: skip
        self._pipeline = pipeline
        self._models = models
        self._settings = settings
        self._loader = loader
        self._failed: dict[int, float] = {}            # version that would not load -> when to try again
        self._failures: dict[int, int] = {}            # version -> how many loads of it failed
        self._repin_after = 0.0                         # a damaged serving version: when to hash it again
        self._pending: ServingBundle | None = None      # loaded, waiting for Triton to have its ranker ready
        self._closing: set[asyncio.Task[None]] = set()  # old bundles waiting for their last request
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.switches = 0
        self.repins = 0

    def start(self) -> None:
        """Start polling (no-op when ``repository_poll_s`` is 0)."""
        if self._settings.repository_poll_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="version-follower")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.repository_poll_s)
            try:
                await self.check()
            except Exception:  # a bad poll must not end following; the next one retries
                log.exception("checking the model repository failed")

    async def check(self) -> bool:
        """Switch if the repository says another version should serve; True if it switched."""
        async with self._lock:
            s = self._settings
            state = await asyncio.to_thread(read_serving, s.model_repository, s.triton_model)
            if state is not None:
                newest: int | None = state.version
            else:
                newest = await asyncio.to_thread(latest_version, s.model_repository, s.triton_model)
            current = self._pipeline.bundle.model_version
            if self._pending is not None and (newest is None or str(newest) != self._pending.model_version):
                stale, self._pending = self._pending, None
                await stale.close()     # the repository moved on (a rollback, a newer version) while it waited
            if newest is not None and str(newest) == current:
                await self._keep_pinned(state, current)
                return False
            if newest is None or self._failed.get(newest, 0.0) > time.monotonic():
                return False
            pending, self._pending = self._pending, None    # from here on, ``bundle`` below owns it
            verified: tuple[int, ...] = ()
            if pending is not None:
                bundle = pending        # loaded at an earlier poll, when Triton could not take the version
            else:
                directory = s.model_repository / s.triton_model / str(newest)
                try:
                    bundle = await asyncio.to_thread(self._loader, directory, str(newest), s)
                except Exception as exc:  # noqa: BLE001 - any failure refuses the version; logged with its cause
                    self._refuse(newest, current, exc)
                    return False
                verified = (newest,)    # the loader has just checked its files: _pin need not hash them again
            try:
                if not await self._models.is_model_ready(str(newest)):
                    await self._pin(state, verified)
                ready = await self._models.is_model_ready(str(newest))
            except RankerUnavailable as exc:
                ready = False
                if pending is None:     # once per wait, not at every poll of an outage
                    log.warning("ranker version %d not loadable yet (%s); keeping its bundle loaded and "
                                "retrying at every poll", newest, exc)  # fmt: skip
            except BaseException as exc:
                await bundle.close()    # nothing else holds it: its index and search thread would leak
                if not isinstance(exc, Exception):
                    raise
                self._refuse(newest, current, exc)
                return False
            if not ready:
                # Kept rather than closed (see the module doc, step 2): while Triton is down the next poll
                # costs one failed readiness call, not a full load; once Triton is back it switches at once.
                self._pending = bundle
                return False
            self._failures.pop(newest, None)
            previous = self._pipeline.swap(bundle)
            self.switches += 1
            log.info("switched to %s version %d (index %s); version %s drains", s.triton_model, newest,
                     bundle.index_version, previous.model_version)  # fmt: skip
            task = asyncio.create_task(self._retire(previous), name=f"retire-{previous.model_version}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            return True

    def _refuse(self, version: int, current: str, exc: Exception) -> None:
        # Not every poll (a broken version stays broken), but not never (a half-synced copy heals).
        failures = self._failures[version] = self._failures.get(version, 0) + 1
        pause = min(_RETRY_FAILED_S * 2 ** (failures - 1), _RETRY_FAILED_MAX_S)
        self._failed[version] = time.monotonic() + pause
        model = self._settings.triton_model
        if failures == 1 and not isinstance(exc, RecsvcError | OSError):
            # Not an error we expect from a bad version (a bug, ONNX Runtime, faiss): the traceback, once.
            log.error("version %d of %s cannot be served, staying on %s; retrying in %.0f s",
                      version, model, current, pause, exc_info=exc)  # fmt: skip
        elif failures == 1:
            log.error("version %d of %s cannot be served, staying on %s; retrying in %.0f s: %s",
                      version, model, current, pause, exc)  # fmt: skip
        else:
            log.warning("version %d of %s still cannot be served (%d tries), retrying in %.0f s: %s",
                        version, model, failures, pause, exc)  # fmt: skip

    async def _keep_pinned(self, state: ServingState | None, current: str) -> None:
        try:
            if await self._models.is_model_ready(current):
                return
        except RankerUnavailable:
            return      # Triton unreachable: answers are degraded until it is back, then it is re-pinned
        if time.monotonic() < self._repin_after:
            return
        log.warning("ranker version %s is not loaded in Triton (restarted?): loading it again", current)
        self.repins += 1
        try:
            await self._pin(state)
        except RankerUnavailable as exc:
            log.warning("re-pinning version %s failed, retrying at the next poll: %s", current, exc)
        except BundleError as exc:
            # Answers stay degraded (retrieval order) rather than ranked by a damaged model; hashing the
            # files again at every poll would only burn CPU, so wait before looking again.
            self._repin_after = time.monotonic() + _RETRY_FAILED_S
            log.error("not re-pinning version %s, answers stay unranked; checking again in %.0f s: %s",
                      current, _RETRY_FAILED_S, exc)  # fmt: skip

    async def _pin(self, state: ServingState | None, verified: Collection[int] = ()) -> None:
        # Exactly the set the rollout asked for, so no replica can unload a version another one uses;
        # but never a version whose files no longer match its checksums (hashed here, off the loop),
        # except those in ``verified``: checked by the loader a moment ago, not hashed twice in a row.
        s = self._settings
        if state is None:
            newest = await asyncio.to_thread(latest_version, s.model_repository, s.triton_model)
            if newest is not None and newest not in verified and not await asyncio.to_thread(
                    pinnable_versions, s.model_repository, s.triton_model, [newest]):  # fmt: skip
                raise BundleError(f"{s.triton_model} version {newest} is damaged; not loading it into Triton")
            await self._models.load_model()
            return
        unchecked = [v for v in state.loaded if v not in verified]
        good = set(await asyncio.to_thread(pinnable_versions, s.model_repository, s.triton_model, unchecked))
        versions = [v for v in state.loaded if v in good or v in verified]
        if state.version not in versions:
            raise BundleError(f"{s.triton_model} version {state.version} is damaged; not loading it into Triton")
        config = await asyncio.to_thread(fitted_config, s.model_repository, s.triton_model, state.version)
        await self._models.load_versions(versions, config)

    async def _retire(self, bundle: ServingBundle) -> None:
        # A request has at most request_timeout_s; waiting longer only happens if one is stuck.
        wait = self._settings.request_timeout_s + self._settings.grace_s
        if not await bundle.drain(wait):
            log.warning("version %s still has %d requests after %.1f s; closing it anyway",
                        bundle.model_version, bundle.in_flight, wait)  # fmt: skip
        await bundle.close()
        # The server froze its start-up objects (app.py): a retired bundle among them, reference cycles
        # included, would never be freed. Unfrozen now; a second later, when this task and its caller
        # have dropped their references, one full collection frees it and the rest is frozen again
        # (tens of ms, once per retired version).
        if gc.get_freeze_count():
            gc.unfreeze()
            asyncio.get_running_loop().call_later(1.0, _refreeze)

    async def close(self) -> None:
        """Stop polling, close a bundle still waiting for Triton and every replaced one (after their requests)."""
        await cancel_and_wait(self._task)
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _refreeze() -> None:
    gc.collect()
    gc.freeze()
