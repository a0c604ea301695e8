"""The gRPC server: servicer, health, reflection, error mapping; the only hand-written importer of grpc."""

from __future__ import annotations

from recsvc.server.app import SERVICE_NAME, Service, build_service, serve, write_port_file

__all__ = ["SERVICE_NAME", "Service", "build_service", "serve", "write_port_file"]
