"""Wait until the model repository holds a complete published version (an init container's job).

recsvc refuses to start without one (Triton pods need no such wait: they start with nothing loaded and load
what serving.json lists). Waiting here keeps the pod in Init, which says what is missing, instead of a
crash loop with growing back-off.
Reads RECSVC_MODEL_REPOSITORY and RECSVC_TRITON_MODEL like the service does.
"""

import logging
import os
import time
from pathlib import Path

from recsvc.repository import latest_version

log = logging.getLogger("wait-for-model")


def main() -> None:
    """Return once a version exists; log every minute while waiting."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    repository = Path(os.environ["RECSVC_MODEL_REPOSITORY"])
    model = os.environ.get("RECSVC_TRITON_MODEL", "ranker")
    waited = 0
    while (version := latest_version(repository, model)) is None:
        if waited % 60 == 0:
            log.info("no published version of %s in %s yet; publish one (docs/DEPLOY.md)", model, repository)
        time.sleep(5)
        waited += 5
    log.info("found %s version %d", model, version)


if __name__ == "__main__":
    main()
