"""Every Triton config we ship parses into Triton's ModelConfig and says what the service relies on."""

from __future__ import annotations

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


def test_the_configs_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in CONFIGS}
    assert {
        "model_repository/ranker/config.pbtxt",
        "recsvc/repository/templates/ranker_cpu.pbtxt",
        "recsvc/repository/templates/ranker_gpu.pbtxt",
    } <= names


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


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "ranker_gpu.pbtxt"], ids=lambda p: p.name)
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


def test_repository_config_is_the_packaged_cpu_template() -> None:
    # publish() writes the packaged template into repositories that have no config; the two must not drift.
    assert (ROOT / "model_repository" / "ranker" / "config.pbtxt").read_text() == config_template("cpu")
    assert config_template("gpu") == (TEMPLATES / "ranker_gpu.pbtxt").read_text()


def test_unknown_flavour_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="flavour"):
        config_template("tpu")
