"""GPU ranking paths: TensorRT engines (FP16, INT8 calibrated on samples.npz) and the torch CUDA FP16 ranker.

Each is compared with ONNX Runtime on CPU running the same bundle's ranker.onnx, on the bundle's real
samples (the trained tiny bundle of tests/conftest.py). Skipped on hosts without a GPU (CI here has none),
and the engine tests also without the tensorrt package; run on a GPU host with `pytest tests/gpu`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import recsvc.repository
from recsvc.bundle import PADDING_SCORE, read_manifest
from recsvc.errors import ConfigError
from recsvc.offline.engines import build_engine_for, resolve_source
from recsvc.offline.models.export import export_ranker_torchscript
from recsvc.offline.models.tensorrt import EngineSpec, calibration_cache_path, info_path
from recsvc.offline.models.train import Trained
from recsvc.offline.triton_server import find_tritonserver
from recsvc.repository import publish, version_dir
from recsvc.repository.publishing import config_for_bundle

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _tritonserver() -> bool:
    try:
        find_tritonserver()
    except ConfigError:
        return False
    return True


needs_cuda = pytest.mark.skipif(not _cuda(), reason="torch sees no CUDA device")
needs_tensorrt = pytest.mark.skipif(
    not _cuda() or importlib.util.find_spec("tensorrt") is None, reason="needs a CUDA device and the tensorrt package"
)
needs_tritonserver = pytest.mark.skipif(
    not _cuda() or not _tritonserver(), reason="needs a CUDA device and the bundled tritonserver (nvidia-pytriton)"
)


@pytest.fixture(scope="module")
def samples(tiny_bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(tiny_bundle / "samples.npz") as npz:
        return npz["HISTORY"], npz["CANDIDATES"]


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path, samples: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(tiny_bundle / "ranker.onnx"), providers=["CPUExecutionProvider"])
    history, candidates = samples
    return np.asarray(session.run(["SCORES"], {"HISTORY": history, "CANDIDATES": candidates})[0])


def compare(got: np.ndarray, expected: np.ndarray, candidates: np.ndarray, *, rel: float, top10: float) -> None:
    """Scores within ``rel`` of the largest score, padding exact, and each row's top 10 mostly kept."""
    valid = candidates >= 0
    assert got.shape == expected.shape and got.dtype == np.float32
    scale = float(np.abs(expected[valid]).max())
    assert float(np.abs(got - expected)[valid].max()) <= rel * scale
    assert np.all(got[~valid] == np.float32(PADDING_SCORE))
    kept = [len(set(np.argsort(-g)[:10]) & set(np.argsort(-e)[:10])) for g, e in zip(got, expected, strict=True)]
    assert float(np.mean(kept)) >= top10


def run_plan(plan: Path, history: np.ndarray, candidates: np.ndarray, max_batch: int = 64) -> np.ndarray:
    """Run a serialized engine on the rows, ``max_batch`` at a time (the profile's largest batch)."""
    import tensorrt as trt  # type: ignore[import-not-found]
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None, f"{plan} does not deserialise on this GPU / TensorRT"
    assert engine.get_tensor_dtype("HISTORY") == trt.int64 and engine.get_tensor_dtype("SCORES") == trt.float32
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    parts = []
    for lo in range(0, len(history), max_batch):
        feeds = {"HISTORY": torch.from_numpy(history[lo : lo + max_batch]).cuda(),
                 "CANDIDATES": torch.from_numpy(candidates[lo : lo + max_batch]).cuda()}  # fmt: skip
        out = torch.empty(feeds["CANDIDATES"].shape, dtype=torch.float32, device="cuda")
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        context.set_tensor_address("SCORES", out.data_ptr())
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        parts.append(out.cpu().numpy())
    return np.concatenate(parts)


def _built(tmp_path: Path, tiny_bundle: Path, precision: str) -> tuple[Path, dict[str, Any]]:
    import tensorrt as trt
    import torch

    source = resolve_source(tiny_bundle)
    spec = EngineSpec(history_len=source.manifest.history_len, num_candidates=source.manifest.num_candidates,
                      precision=precision)  # fmt: skip
    plan, info = build_engine_for(source, spec, plan=tmp_path / "model.plan", calibration_batch=16)
    recorded = json.loads(info_path(plan).read_text())
    assert recorded["tensorrt_version"] == trt.__version__ == info.tensorrt_version
    assert recorded["gpu"] == torch.cuda.get_device_name(torch.cuda.current_device())
    assert recorded["precision"] == precision and recorded["build_seconds"] > 0
    return plan, recorded


@needs_tensorrt
def test_fp16_engine_matches_onnx_runtime(
    tmp_path: Path, tiny_bundle: Path, samples: tuple[np.ndarray, np.ndarray], reference: np.ndarray
) -> None:
    plan, _ = _built(tmp_path, tiny_bundle, "fp16")
    history, candidates = samples
    compare(run_plan(plan, history, candidates), reference, candidates, rel=1e-2, top10=9.5)


@needs_tensorrt
def test_int8_engine_calibrated_on_the_bundles_samples_stays_close_to_onnx_runtime(
    tmp_path: Path, tiny_bundle: Path, samples: tuple[np.ndarray, np.ndarray], reference: np.ndarray
) -> None:
    plan, recorded = _built(tmp_path, tiny_bundle, "int8")
    assert recorded["calibration_rows"] >= 16
    assert calibration_cache_path(plan).stat().st_size > 0       # what a trtexec INT8 build can reuse
    history, candidates = samples
    compare(run_plan(plan, history, candidates), reference, candidates, rel=1e-1, top10=8.0)


@needs_tensorrt
def test_trtexec_engine_matches_onnx_runtime_where_trtexec_is_installed(
    tmp_path: Path, tiny_bundle: Path, samples: tuple[np.ndarray, np.ndarray], reference: np.ndarray
) -> None:
    bundled = Path("/usr/src/tensorrt/bin/trtexec")      # where NGC images put it when it is not on PATH
    trtexec = shutil.which("trtexec") or (str(bundled) if bundled.exists() else None)
    if trtexec is None:
        pytest.skip("no trtexec on this host")
    source = resolve_source(tiny_bundle)
    spec = EngineSpec(history_len=source.manifest.history_len, num_candidates=source.manifest.num_candidates)
    plan, info = build_engine_for(source, spec, plan=tmp_path / "model.plan", trtexec=Path(trtexec))
    assert info.tensorrt_version != "unknown" and info.gpu != "unknown"
    history, candidates = samples
    compare(run_plan(plan, history, candidates), reference, candidates, rel=1e-2, top10=9.5)


def _torch_version(tmp_path: Path, tiny_bundle: Path, tiny_trained: Trained) -> Path:
    """A published version of the tiny bundle carrying model_torch.py and ranker.pt, as gpu-torch expects."""
    version = version_dir(tmp_path / "repo", "ranker", publish(tiny_bundle, tmp_path / "repo"))
    cfg = tiny_trained.config
    export_ranker_torchscript(tiny_trained.ranker, cfg.history_len, cfg.num_candidates, version / "ranker.pt")
    shutil.copy(Path(recsvc.repository.__file__).parent / "model_torch.py", version / "model_torch.py")
    return version


@needs_cuda
def test_torch_cuda_fp16_ranker_matches_onnx_runtime(
    tmp_path: Path, tiny_bundle: Path, tiny_trained: Trained, samples: tuple[np.ndarray, np.ndarray],
    reference: np.ndarray, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import sys
    import types

    from tests.unit.repository.test_ranker_backend_model import (
        FakeRequest,
        FakeResponse,
        FakeTensor,
        FakeTritonError,
        get_input_tensor_by_name,
    )

    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = FakeTensor, FakeResponse, FakeTritonError  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = get_input_tensor_by_name  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "recsvc.repository.model_torch", raising=False)
    import recsvc.repository.model_torch as model_torch

    version = _torch_version(tmp_path, tiny_bundle, tiny_trained)
    model = model_torch.TritonPythonModel()
    model.initialize({
        "model_config": json.dumps({"parameters": {"TORCH_PRECISION": {"string_value": "fp16"}}}),
        "model_repository": str(version.parent), "model_version": version.name, "model_name": "ranker",
        "model_instance_kind": "GPU", "model_instance_device_id": "0",
    })  # fmt: skip
    try:
        assert model.device.type == "cuda"
        history, candidates = samples
        requests = [FakeRequest({"HISTORY": history[lo : lo + 64], "CANDIDATES": candidates[lo : lo + 64]})
                    for lo in range(0, len(history), 64)]  # fmt: skip
        responses = model.execute(requests)
        assert all(r.error is None for r in responses)
        got = np.concatenate([r.output_tensors[0].array for r in responses])
    finally:
        model.finalize()
        monkeypatch.delitem(sys.modules, "recsvc.repository.model_torch", raising=False)
    compare(got, reference, candidates, rel=1e-2, top10=9.5)


@needs_tritonserver
async def test_triton_serves_the_torch_cuda_fp16_ranker_through_the_python_backend(
    tmp_path: Path, tiny_bundle: Path, tiny_trained: Trained, samples: tuple[np.ndarray, np.ndarray],
    reference: np.ndarray,
) -> None:  # fmt: skip
    """The gpu-torch target as shipped (KIND_GPU, fp16), in the real tritonserver, queried over gRPC."""
    import tritonclient.grpc as grpcclient

    from tests.integration.triton_fixture import running_triton

    version = _torch_version(tmp_path, tiny_bundle, tiny_trained)
    config = config_for_bundle("gpu-torch", read_manifest(version / "bundle"))
    (version.parent / "config.pbtxt").write_text(config)
    history, candidates = samples
    async with running_triton(version.parent.parent, startup_timeout_s=180) as (server, url):
        client = grpcclient.InferenceServerClient(url)
        parts = []
        for lo in range(0, len(history), 64):
            h, c = history[lo : lo + 64], candidates[lo : lo + 64]
            inputs = [grpcclient.InferInput("HISTORY", list(h.shape), "INT64"),
                      grpcclient.InferInput("CANDIDATES", list(c.shape), "INT64")]  # fmt: skip
            inputs[0].set_data_from_numpy(h)
            inputs[1].set_data_from_numpy(c)
            parts.append(client.infer("ranker", inputs).as_numpy("SCORES"))
        client.close()
        assert "(GPU device 0)" in server.log_tail()          # the instance really is a GPU instance
    compare(np.concatenate(parts), reference, candidates, rel=1e-2, top10=9.5)
