"""Keep this pod's Triton on the newest published version (a sidecar next to tritonserver).

Triton runs in EXPLICIT model-control mode, so a version is served only after a load request reaches that
Triton. recsvc asks the Triton its own connection happens to reach; with several Triton replicas behind
one Service, some would never be asked. This sidecar asks its own Triton (over localhost) whenever a newer
complete version appears, so every replica serves it shortly after `recsvc publish`.

A version counts once it is complete (bundle/manifest.json, as recsvc sees it) and holds
LOADER_REQUIRED_FILE: for the TensorRT target that is model.plan, which the engine build adds.
Settings come from RECSVC_* like the service's (model repository, model name, Triton URL, poll period).
"""

import asyncio
import logging
import os

from recsvc.config import Settings, load_settings
from recsvc.errors import RankerUnavailable
from recsvc.ranking import TritonRanker
from recsvc.repository import list_versions, version_dir

log = logging.getLogger("model-loader")


def newest_loadable(settings: Settings, required_file: str) -> int | None:
    """Newest complete version that also has ``required_file``, or None."""
    repo, model = settings.model_repository, settings.triton_model
    ready = [v for v in list_versions(repo, model) if (version_dir(repo, model, v) / required_file).is_file()]
    return ready[-1] if ready else None


async def run() -> None:
    """Poll the repository; ask Triton to (re)load the model when a newer version is ready to load."""
    settings = load_settings()
    required_file = os.environ.get("LOADER_REQUIRED_FILE", "model.onnx")
    ranker = TritonRanker.from_settings(settings)
    period = settings.repository_poll_s or 2.0
    loaded: int | None = None
    try:
        while True:
            version = newest_loadable(settings, required_file)
            if version is not None and version != loaded:
                try:
                    if not await ranker.is_model_ready(str(version)):
                        log.info("loading %s version %d", settings.triton_model, version)
                        # Triton rescans the model directory and loads what the version policy selects.
                        await ranker.load_model()
                    if await ranker.is_model_ready(str(version)):
                        loaded = version
                        log.info("%s version %d is ready", settings.triton_model, version)
                except RankerUnavailable as exc:
                    # Triton still starting, or the load failed: try again next round.
                    log.warning("%s", exc)
            await asyncio.sleep(period)
    finally:
        await ranker.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run())
