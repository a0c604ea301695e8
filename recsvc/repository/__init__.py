"""The Triton model repository: versions published from bundles, read by the serving runtime.

Running tritonserver locally is the offline toolchain's job (recsvc/offline/triton_server.py).
"""

from __future__ import annotations

from recsvc.repository.publishing import (
    STAGING_PREFIX,
    config_template,
    latest_version,
    list_versions,
    publish,
    version_dir,
)

__all__ = [
    "STAGING_PREFIX",
    "config_template",
    "latest_version",
    "list_versions",
    "publish",
    "version_dir",
]
