"""The gRPC server: servicer, health, reflection, error mapping; the only hand-written importer of grpc.

The names below load ``recsvc.server.app`` (the whole serving pipeline) on first use, not on import of
the package: the bundled client (``recsvc.server.client``) lives here too and must start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsvc.server.app import SERVICE_NAME, Service, build_service, serve, write_port_file

__all__ = ["SERVICE_NAME", "Service", "build_service", "serve", "write_port_file"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("recsvc.server.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
