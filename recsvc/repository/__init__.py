"""The Triton model repository: publishing bundles as versions, and running the bundled tritonserver."""

from __future__ import annotations

from recsvc.repository.publishing import (
    STAGING_PREFIX,
    config_template,
    latest_version,
    list_versions,
    publish,
    version_dir,
)
from recsvc.repository.triton_server import (
    SupervisedTriton,
    TritonDistribution,
    TritonOptions,
    TritonServer,
    find_tritonserver,
    options_from_settings,
    serve_triton,
)

__all__ = [
    "STAGING_PREFIX",
    "SupervisedTriton",
    "TritonDistribution",
    "TritonOptions",
    "TritonServer",
    "config_template",
    "find_tritonserver",
    "latest_version",
    "list_versions",
    "options_from_settings",
    "publish",
    "serve_triton",
    "version_dir",
]
