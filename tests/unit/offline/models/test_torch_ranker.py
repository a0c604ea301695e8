"""The TorchScript ranker (ranker.pt) and the python-backend model that serves it (model_torch.py), on CPU.

The trace must score the bundle's real samples like the ONNX ranker does; model_torch.py runs outside
Triton with the stand-in pb_utils of test_ranker_backend_model.py, and once inside the real bundled
tritonserver (the gpu-torch config with its instance kind switched to CPU). The CUDA FP16 runs are in
tests/gpu/test_gpu_ranking.py.
"""

from __future__ import annotations

import importlib
import itertools
import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import recsvc.repository
from recsvc.bundle import PADDING_SCORE, read_manifest
from recsvc.offline.models.export import export_ranker_torchscript
from recsvc.offline.models.train import Trained
from recsvc.repository import publish, version_dir
from tests.unit.repository.test_ranker_backend_model import (
    FakeRequest,
    FakeResponse,
    FakeTensor,
    FakeTritonError,
    get_input_tensor_by_name,
)

MODULE = "recsvc.repository.model_torch"


def onnx_scores(onnx: Path, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["SCORES"], {"HISTORY": history, "CANDIDATES": candidates})[0])


@pytest.fixture(scope="module")
def real_samples(tiny_bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(tiny_bundle / "samples.npz") as samples:
        return samples["HISTORY"], samples["CANDIDATES"]


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_trained: Trained) -> Path:
    """A published version of the trained tiny bundle, with the ranker's TorchScript next to model.onnx."""
    root = tmp_path_factory.mktemp("torch-version")
    path = version_dir(root / "repo", "ranker", publish(tiny_bundle, root / "repo"))
    cfg = tiny_trained.config
    export_ranker_torchscript(tiny_trained.ranker, cfg.history_len, cfg.num_candidates, path / "ranker.pt")
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_ranker_scores_real_samples_like_the_onnx_ranker(
    version: Path, real_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    history, candidates = real_samples
    assert (candidates == -1).any() or len(history) > 100          # real rows, padding included when there is any
    with torch.no_grad():
        module = torch.jit.load(str(version / "ranker.pt"))
        traced = module(torch.from_numpy(history), torch.from_numpy(candidates)).numpy()
    expected = onnx_scores(version / "model.onnx", history, candidates)
    assert traced.dtype == np.float32 and traced.shape == expected.shape
    np.testing.assert_allclose(traced, expected, rtol=1e-4, atol=1e-4)
    # And for another batch size and candidate count than the trace was made with.
    few = candidates[:3, :7]
    with torch.no_grad():
        traced = module(torch.from_numpy(history[:3]), torch.from_numpy(few)).numpy()
    np.testing.assert_allclose(traced, onnx_scores(version / "model.onnx", history[:3], few), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- model_torch
@pytest.fixture(scope="module")
def model_module() -> Iterator[Any]:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor  # type: ignore[attr-defined]
    fake.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    fake.TritonError = FakeTritonError  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = get_input_tensor_by_name  # type: ignore[attr-defined]
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = fake
    try:
        sys.modules.pop(MODULE, None)
        yield importlib.import_module(MODULE)
    finally:
        sys.modules.pop(MODULE, None)
        if saved is not None:
            sys.modules["triton_python_backend_utils"] = saved
        else:
            del sys.modules["triton_python_backend_utils"]


def make_model(module: Any, version: Path, precision: str, kind: str = "CPU") -> Any:
    instance = module.TritonPythonModel()
    config = {"parameters": {"TORCH_PRECISION": {"string_value": precision}}}
    instance.initialize({
        "model_config": json.dumps(config), "model_repository": str(version.parent),
        "model_version": version.name, "model_name": "ranker", "model_instance_kind": kind,
        "model_instance_device_id": "0",
    })  # fmt: skip
    return instance


@pytest.fixture(scope="module")
def fp32_model(model_module: Any, version: Path) -> Iterator[Any]:
    instance = make_model(model_module, version, "fp32")
    yield instance
    instance.finalize()


def test_fp32_model_answers_each_request_with_its_rows_of_the_onnx_scores(
    fp32_model: Any, version: Path, real_samples: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    history, candidates = real_samples
    sizes = (1, 5, 2)
    starts = np.cumsum((0, *sizes))
    requests = [FakeRequest({"HISTORY": history[a:b], "CANDIDATES": candidates[a:b]})
                for a, b in itertools.pairwise(starts)]  # fmt: skip
    calls: list[int] = []
    real = fp32_model.scores

    def counting(h: np.ndarray, c: np.ndarray) -> np.ndarray:
        calls.append(len(h))
        return np.asarray(real(h, c))

    monkeypatch.setattr(fp32_model, "scores", counting)
    responses = fp32_model.execute(requests)
    assert calls == [8]                                         # one forward call for the three requests
    expected = onnx_scores(version / "model.onnx", history[:8], candidates[:8])
    for (a, b), response in zip(itertools.pairwise(starts), responses, strict=True):
        assert response.error is None
        [scores] = response.output_tensors
        assert scores.name == "SCORES" and scores.array.dtype == np.float32
        np.testing.assert_allclose(scores.array, expected[a:b], rtol=1e-5, atol=1e-5)


def test_fp16_autocast_stays_close_to_fp32_and_keeps_the_ranking(
    model_module: Any, version: Path, real_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    history, candidates = real_samples[0][:64], real_samples[1][:64]
    model = make_model(model_module, version, "fp16")
    try:
        [response] = model.execute([FakeRequest({"HISTORY": history, "CANDIDATES": candidates})])
    finally:
        model.finalize()
    got = response.output_tensors[0].array
    expected = onnx_scores(version / "model.onnx", history, candidates)
    assert got.dtype == np.float32
    valid = candidates >= 0
    scale = float(np.abs(expected[valid]).max())
    assert float(np.abs(got - expected)[valid].max()) <= 2e-2 * scale
    assert np.all(got[~valid] == np.float32(PADDING_SCORE))
    # The ranker's job is the order: FP16 must keep each row's top 10.
    top = [len(set(np.argsort(-g)[:10]) & set(np.argsort(-e)[:10])) for g, e in zip(got, expected, strict=True)]
    assert np.mean(top) >= 9.0


def test_padding_candidates_get_the_padding_score(fp32_model: Any, version: Path) -> None:
    manifest = read_manifest(version / "bundle")
    history = np.full((1, manifest.history_len), -1, dtype=np.int64)
    candidates = np.full((1, manifest.num_candidates), -1, dtype=np.int64)
    candidates[0, :2] = [3, 4]
    [response] = fp32_model.execute([FakeRequest({"HISTORY": history, "CANDIDATES": candidates})])
    scores = response.output_tensors[0].array
    assert np.all(scores[0, 2:] == np.float32(PADDING_SCORE))
    assert np.all(np.abs(scores[0, :2]) < 1e3)


def test_bad_requests_get_their_own_errors(fp32_model: Any, version: Path) -> None:
    manifest = read_manifest(version / "bundle")
    L, C, N = manifest.history_len, manifest.num_candidates, manifest.num_items
    good = FakeRequest({"HISTORY": np.zeros((1, L), np.int64), "CANDIDATES": np.zeros((1, C), np.int64)})
    bad = {
        "input CANDIDATES is missing": {"HISTORY": np.zeros((1, L), np.int64)},
        "must be int64": {"HISTORY": np.zeros((1, L), np.int32), "CANDIDATES": np.zeros((1, C), np.int64)},
        f"must have {L} columns": {"HISTORY": np.zeros((1, L + 1), np.int64), "CANDIDATES": np.zeros((1, C), np.int64)},
        "outside": {"HISTORY": np.zeros((1, L), np.int64), "CANDIDATES": np.full((1, C), N, np.int64)},
        "rows": {"HISTORY": np.zeros((2, L), np.int64), "CANDIDATES": np.zeros((1, C), np.int64)},
    }
    responses = fp32_model.execute([good, *(FakeRequest(inputs) for inputs in bad.values()), good])
    assert responses[0].error is None and responses[-1].error is None
    for message, response in zip(bad, responses[1:-1], strict=True):
        assert response.error is not None and message in response.error.message()
        assert response.error.code == FakeTritonError.INVALID_ARG


def test_a_failing_forward_fails_only_its_group(
    fp32_model: Any, version: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = read_manifest(version / "bundle")
    real = fp32_model.scores

    def fails_for_wide(h: np.ndarray, c: np.ndarray) -> np.ndarray:
        if c.shape[1] == 4:
            raise RuntimeError("CUDA error: boom")
        return np.asarray(real(h, c))

    monkeypatch.setattr(fp32_model, "scores", fails_for_wide)
    history = np.zeros((1, manifest.history_len), np.int64)
    responses = fp32_model.execute([
        FakeRequest({"HISTORY": history, "CANDIDATES": np.zeros((1, 3), np.int64)}),
        FakeRequest({"HISTORY": history, "CANDIDATES": np.zeros((1, 4), np.int64)}),
    ])  # fmt: skip
    assert responses[0].error is None and responses[0].output_tensors[0].array.shape == (1, 3)
    assert responses[1].error is not None and "boom" in responses[1].error.message()
    assert responses[1].error.code == FakeTritonError.INTERNAL


def test_configuration_errors_fail_the_load(model_module: Any, version: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TORCH_PRECISION must be one of"):
        make_model(model_module, version, "int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"instance kind GPU but torch .* sees no CUDA device"):
            make_model(model_module, version, "fp16", kind="GPU")
    empty = tmp_path / "ranker" / "1"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no TorchScript ranker"):
        make_model(model_module, empty, "fp32")


def test_the_bundles_copy_of_ranker_pt_is_found_too(model_module: Any, version: Path, tmp_path: Path) -> None:
    other = tmp_path / "ranker" / "7"
    shutil.copytree(version / "bundle", other / "bundle")
    shutil.copy(version / "ranker.pt", other / "bundle" / "ranker.pt")
    model = make_model(model_module, other, "fp32")
    try:
        assert model.history_len == read_manifest(other / "bundle").history_len
    finally:
        model.finalize()


# ------------------------------------------------------------------------- the real tritonserver
@pytest.mark.integration
async def test_the_real_tritonserver_serves_model_torch_by_its_file_name(
    tmp_path: Path, version: Path, real_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """The gpu-torch config (instance kind switched to CPU) loads model_torch.py through default_model_filename.

    Its warm-up samples are rendered for the bundle's L and C, and the answers are the ONNX ranker's.
    """
    import tritonclient.grpc as grpcclient

    from recsvc.repository.publishing import config_for_bundle
    from tests.integration.triton_fixture import running_triton

    repo = tmp_path / "repo"
    shutil.copytree(version, repo / "ranker" / "1")
    shutil.copy(Path(recsvc.repository.__file__).parent / "model_torch.py", repo / "ranker" / "1" / "model_torch.py")
    config = config_for_bundle("gpu-torch", read_manifest(version / "bundle"))
    assert config.count("KIND_GPU") == 1
    (repo / "ranker" / "config.pbtxt").write_text(config.replace("KIND_GPU", "KIND_CPU"))
    history, candidates = real_samples[0][:4], real_samples[1][:4]
    async with running_triton(repo, startup_timeout_s=120) as (server, url):
        client = grpcclient.InferenceServerClient(url)
        inputs = [grpcclient.InferInput("HISTORY", list(history.shape), "INT64"),
                  grpcclient.InferInput("CANDIDATES", list(candidates.shape), "INT64")]  # fmt: skip
        inputs[0].set_data_from_numpy(history)
        inputs[1].set_data_from_numpy(candidates)
        scores = client.infer("ranker", inputs).as_numpy("SCORES")
        client.close()
        assert [line for line in server.log_tail().splitlines() if line.startswith("E")] == []
    expected = onnx_scores(version / "model.onnx", history, candidates)
    valid = candidates >= 0
    # The template's precision is fp16 (autocast, here on the CPU): close, and the order holds.
    assert float(np.abs(scores - expected)[valid].max()) <= 2e-2 * float(np.abs(expected[valid]).max())
    assert np.all(scores[~valid] == np.float32(PADDING_SCORE))
