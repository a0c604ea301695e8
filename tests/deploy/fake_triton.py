"""Triton's gRPC API as far as recsvc's rollout uses it, in-process, for the chart's script tests.

ServerReady, ModelReady, RepositoryModelLoad (the config override's ``version_policy.specific``, or the
config file's newest two without one) and ModelInfer, which runs ONNX Runtime on ``<repository>/<model>/
<version>/model.onnx`` as the real python backend does. A version loads only when its directory is there,
so a pod copy that lacks a version fails its load as a real Triton would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2, service_pb2_grpc


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Path, model: str = "ranker") -> None:
        self.repository = repository
        self.model = model
        self.loaded: set[int] = set()
        self.loads: list[list[int]] = []
        self._lock = threading.Lock()

    def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        with self._lock:
            ready = request.name == self.model and request.version.isdigit() and int(request.version) in self.loaded
        return service_pb2.ModelReadyResponse(ready=ready)

    def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        model_dir = self.repository / request.model_name
        if "config" in request.parameters:
            policy = json.loads(request.parameters["config"].string_param)["version_policy"]
            versions = sorted(int(v) for v in policy["specific"]["versions"])
        else:
            on_disk = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) if model_dir.is_dir() else []
            versions = on_disk[-2:]
        with self._lock:
            self.loads.append(versions)
            missing = [v for v in versions if not (model_dir / str(v) / "model.onnx").is_file()]
            # Like Triton: the versions that load are available, a failed one is not.
            self.loaded = {v for v in versions if v not in missing}
        if missing:
            context.abort(grpc.StatusCode.INTERNAL, f"failed to load '{request.model_name}' versions {missing}")
        return service_pb2.RepositoryModelLoadResponse()

    def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        version = int(request.model_version)
        with self._lock:
            if version not in self.loaded:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"version {version} is not loaded")
        inputs = {
            t.name: np.frombuffer(raw, dtype=np.int64).reshape(tuple(t.shape))
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        session = ort.InferenceSession(str(self.repository / self.model / str(version) / "model.onnx"),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        scores = np.asarray(session.run(["SCORES"], inputs)[0], dtype=np.float32)
        out = service_pb2.ModelInferResponse.InferOutputTensor(name="SCORES", datatype="FP32", shape=scores.shape)
        return service_pb2.ModelInferResponse(model_name=self.model, model_version=str(version), outputs=[out],
                                              raw_output_contents=[scores.tobytes()])  # fmt: skip


@contextmanager
def serve(repository: Path) -> Iterator[tuple[FakeTriton, str]]:
    """A FakeTriton on a free localhost port: (servicer, "127.0.0.1:PORT")."""
    triton = FakeTriton(repository)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield triton, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
