"""Every Triton config we ship parses into Triton's ModelConfig and says what the service relies on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from recsvc.errors import ConfigError
from recsvc.repository import config_template

ROOT = Path(__file__).resolve().parents[3]
TEMPLATES = ROOT / "recsvc" / "repository" / "templates"
CONFIGS = sorted(TEMPLATES.glob("*.pbtxt")) + sorted((ROOT / "model_repository").glob("*/config.pbtxt"))


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


FLAVOURS = {"cpu": "ranker_cpu.pbtxt", "gpu": "ranker_gpu.pbtxt", "gpu-onnx": "ranker_gpu_onnx.pbtxt",
            "gpu-torch": "ranker_gpu_torch.pbtxt"}  # fmt: skip
# The bundle defaults (TrainConfig): warm-up samples need fixed dims, and these are the ones the templates use.
WARMUP_DIMS = {"HISTORY": [50], "CANDIDATES": [100]}


def test_the_configs_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in CONFIGS}
    assert {"model_repository/ranker/config.pbtxt"} | {
        f"recsvc/repository/templates/{name}" for name in FLAVOURS.values()
    } == names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_has_the_ranker_contract(path: Path) -> None:
    config = parse(path)
    # No name: Triton takes it from the directory, so one file serves any model name.
    assert config.name == ""
    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("HISTORY", mc.TYPE_INT64, [-1]),
        ("CANDIDATES", mc.TYPE_INT64, [-1]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("SCORES", mc.TYPE_FP32, [-1])]
    assert config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 2000
    assert all(b <= config.max_batch_size for b in config.dynamic_batching.preferred_batch_size)
    # A 500 ms stall per few hundred requests was measured with a queue policy; keep it out.
    assert not config.dynamic_batching.HasField("default_queue_policy")
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2
    assert config.instance_group and all(g.count >= 1 for g in config.instance_group)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_warms_up_every_input_at_one_row_and_at_the_full_batch(path: Path) -> None:
    config = parse(path)
    declared = {i.name: i.data_type for i in config.input}
    assert [w.batch_size for w in config.model_warmup] == [1, config.max_batch_size]
    for sample in config.model_warmup:
        assert sample.name
        assert set(sample.inputs) == set(declared)
        for name, spec in sample.inputs.items():
            assert spec.data_type == declared[name]
            # Triton refuses [-1] here; the bundle defaults L = 50, C = 100.
            assert list(spec.dims) == WARMUP_DIMS[name]
            # random_data would be random bytes: item ids outside the catalog.
            assert spec.WhichOneof("input_data_type") == "zero_data"


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("ranker_gpu")], ids=lambda p: p.name)
def test_cpu_configs_use_the_python_backend_on_cpu(path: Path) -> None:
    config = parse(path)
    assert config.backend == "python"
    assert config.platform == ""
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    threads = config.parameters["ORT_INTRA_OP_THREADS"].string_value
    assert threads.isdigit() and int(threads) >= 1
    assert config.parameters["ORT_ALLOW_SPINNING"].string_value == "0"


def test_gpu_template_is_a_tensorrt_plan_on_gpu() -> None:
    config = parse(TEMPLATES / "ranker_gpu.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert config.backend == ""
    assert config.default_model_filename == "model.plan"
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    # A plan is run as built: no accelerator to configure on top of it.
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_gpu_onnx_template_is_onnxruntime_with_the_tensorrt_accelerator_in_fp16() -> None:
    config = parse(TEMPLATES / "ranker_gpu_onnx.pbtxt")
    assert config.backend == "onnxruntime"
    assert config.platform == ""
    assert config.default_model_filename == "model.onnx"      # what publish already writes
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert int(accelerator.parameters["max_workspace_size_bytes"]) >= 1 << 28
    # ONNX Runtime's engine cache is keyed by graph, not weights: a retrained ranker would reuse a stale engine.
    assert "trt_engine_cache_enable" not in accelerator.parameters
    assert not config.optimization.execution_accelerators.cpu_execution_accelerator


def test_gpu_torch_template_runs_model_torch_on_gpu_in_fp16() -> None:
    config = parse(TEMPLATES / "ranker_gpu_torch.pbtxt")
    assert config.backend == "python"
    assert config.platform == ""
    # A version directory holds both python models; this name picks the torch one.
    assert config.default_model_filename == "model_torch.py"
    assert (ROOT / "recsvc" / "repository" / "model_torch.py").is_file()
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    assert config.parameters["TORCH_PRECISION"].string_value == "fp16"
    assert config.parameters["TORCH_THREADS"].string_value.isdigit()


def test_repository_config_is_the_packaged_cpu_template() -> None:
    # publish() writes the packaged template into repositories that have no config; the two must not drift.
    assert (ROOT / "model_repository" / "ranker" / "config.pbtxt").read_text() == config_template("cpu")
    for flavour, name in FLAVOURS.items():
        assert config_template(flavour) == (TEMPLATES / name).read_text()


def test_deploy_scripts_still_recognise_the_cpu_and_gpu_configs() -> None:
    # deploy/helm/recsvc/files/publish.sh and commit-version.sh tell the targets apart by these first lines.
    assert re.search(r'^backend: *"python"', config_template("cpu"), flags=re.M)
    assert re.search(r'^platform: *"tensorrt_plan"', config_template("gpu"), flags=re.M)
    assert not re.search(r'^platform: *"tensorrt_plan"', config_template("gpu-onnx"), flags=re.M)


@pytest.mark.parametrize("flavour", ["tpu", "gpu_onnx", "GPU"])
def test_unknown_flavour_is_a_config_error(flavour: str) -> None:
    with pytest.raises(ConfigError, match=r"flavour .* \(known: cpu, gpu, gpu-onnx, gpu-torch\)"):
        config_template(flavour)
