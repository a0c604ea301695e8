"""Optional OpenTelemetry tracing: a span per RPC (opentelemetry-instrumentation-grpc) and per pipeline stage.

Off by default. It is switched on by the standard variable ``OTEL_TRACES_EXPORTER`` set to ``otlp`` or
``console`` (``none`` or unset: off). The OpenTelemetry SDK itself treats an unset variable as ``otlp``;
recsvc does not, so a server started without any OTel configuration never tries to reach a collector,
and the serving runtime does not import OpenTelemetry at all (``enabled()`` reads the environment only).

Everything else is the SDK's standard configuration: ``OTEL_SERVICE_NAME`` (default ``recsvc``) and
``OTEL_RESOURCE_ATTRIBUTES`` for the resource, ``OTEL_TRACES_SAMPLER``/``_ARG`` for sampling,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_*`` and ``OTEL_BSP_*`` for the OTLP/gRPC
exporter and its batching. The packages come with the ``tracing`` extra (``pip install recsvc[tracing]``).

Spans: the instrumentation's server span per call (``/recsvc.v1.Recommender/Recommend``, with the gRPC
status), the request id on it as ``recsvc.request_id``, and one child span per pipeline stage (history,
query, retrieve, rank, respond) carrying the request id too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from recsvc import telemetry
from recsvc.errors import ConfigError

__all__ = ["EXPORTERS", "Tracing", "enabled", "setup"]

EXPORTERS = ("otlp", "console")


def enabled() -> bool:
    """Whether ``OTEL_TRACES_EXPORTER`` asks for traces (without importing OpenTelemetry)."""
    return _exporter_name() not in ("", "none")


def _exporter_name() -> str:
    return os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()


@dataclass
class Tracing:
    """What ``setup`` made: the interceptor that goes first on the server, and the provider to shut down."""

    interceptor: grpc.aio.ServerInterceptor
    provider: Any

    def shutdown(self) -> None:
        """Stop the stage spans, flush the spans still queued and stop the exporter."""
        telemetry.set_tracer(None, None)
        self.provider.shutdown()


def setup(exporter: Any = None) -> Tracing:
    """A tracer provider exporting to ``exporter`` (default: the one OTEL_TRACES_EXPORTER names).

    Tests pass an in-memory exporter (exported at once); a real exporter gets a batch processor.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise ConfigError(f"OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed ({exc.name}): "
                          "install recsvc[tracing], or unset it") from exc  # fmt: skip
    resource = Resource.create()            # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "recsvc"}))
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter()))
    tracer = provider.get_tracer("recsvc")

    def annotate(request_id: str) -> None:
        trace.get_current_span().set_attribute("recsvc.request_id", request_id)

    telemetry.set_tracer(tracer, annotate)
    return Tracing(aio_server_interceptor(tracer_provider=provider), provider)  # type: ignore[no-untyped-call]


def _exporter() -> Any:
    name = _exporter_name()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                                      "grpc"))
        if protocol != "grpc":
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: recsvc[tracing] ships the OTLP/gRPC "
                              "exporter only (use grpc)")  # fmt: skip
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ConfigError(f"OTEL_TRACES_EXPORTER {name!r}: recsvc knows {', '.join(EXPORTERS)} or none")
