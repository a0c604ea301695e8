"""The service's full name, from the proto (what interceptors, auth and the server register under).

A module of its own so that the client side (security's channel helpers, the bundled client) can name the
service without importing the servicer and, through it, the serving pipeline.
"""

from __future__ import annotations

from recsvc.v1 import recommender_pb2 as pb

__all__ = ["SERVICE_NAME"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
