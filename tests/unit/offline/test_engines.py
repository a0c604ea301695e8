"""TensorRT engine builds on a host without TensorRT or a GPU: what can be checked here is checked here.

The numpy calibration feed, the trtexec command line and its log parsing, the clear errors when TensorRT
or a GPU is missing, `recsvc build-engine` end to end with a stand-in trtexec, and the configs rendered for
a bundle's sizes (one loaded by the real bundled tritonserver). Engines themselves are built and compared
with ONNX Runtime in tests/gpu/test_gpu_ranking.py.
"""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import orjson
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from recsvc.bundle import read_manifest, update_manifest
from recsvc.errors import ConfigError
from recsvc.offline import engines
from recsvc.offline.engines import build_engine_for, register, resolve_source
from recsvc.offline.models.tensorrt import (
    PRECISIONS,
    CalibrationBatches,
    EngineSpec,
    build_engine,
    calibration_cache_path,
    info_path,
    parse_trtexec_output,
    read_engine_info,
    trtexec_command,
)
from recsvc.repository import config_template, publish, publishing, version_dir
from recsvc.repository.publishing import config_for_bundle
from recsvc.repository.tiny_bundle import write_tiny_bundle

L, C = 7, 11


def samples(rows: int) -> tuple[np.ndarray, np.ndarray]:
    # Row r holds r in every column, so a batch's rows say exactly which sample rows it came from.
    history = np.repeat(np.arange(rows, dtype=np.int64)[:, None], L, axis=1)
    candidates = np.repeat(np.arange(rows, dtype=np.int64)[:, None], C, axis=1) + 1000
    return history, candidates


# ------------------------------------------------------------------------------------ calibration
def test_calibration_batches_are_full_contiguous_int64_batches_in_file_order() -> None:
    history, candidates = samples(50)
    batches = CalibrationBatches(history.astype(np.int32), candidates, batch_size=16)
    got = list(batches)
    assert len(batches) == len(got) == 3 and batches.rows == 48        # rows 48 and 49 are left out
    for i, batch in enumerate(got):
        assert sorted(batch) == ["CANDIDATES", "HISTORY"]
        for array in batch.values():
            assert array.dtype == np.int64 and array.flags.c_contiguous
        np.testing.assert_array_equal(batch["HISTORY"][:, 0], np.arange(16 * i, 16 * (i + 1)))
        np.testing.assert_array_equal(batch["CANDIDATES"], candidates[16 * i : 16 * (i + 1)])
    # Iterating again starts over: TensorRT may calibrate more than once per build.
    np.testing.assert_array_equal(next(iter(batches))["HISTORY"], history[:16])


def test_calibration_batches_can_be_capped() -> None:
    batches = CalibrationBatches(*samples(100), batch_size=8, max_batches=2)
    assert [int(b["HISTORY"][-1, 0]) for b in batches] == [7, 15]
    assert batches.rows == 16


def test_calibration_batches_come_from_a_bundles_samples_npz(tmp_path: Path) -> None:
    history, candidates = samples(40)
    np.savez(tmp_path / "samples.npz", HISTORY=history, CANDIDATES=candidates)
    batches = CalibrationBatches.from_npz(tmp_path / "samples.npz", history_len=L, num_candidates=C, batch_size=10)
    assert len(batches) == 4
    np.testing.assert_array_equal(np.concatenate([b["CANDIDATES"] for b in batches]), candidates)


@pytest.mark.parametrize(
    ("arrays", "kwargs", "message"),
    [
        ({"HISTORY": samples(40)[0]}, {}, "lacks CANDIDATES"),
        ({"HISTORY": samples(40)[0], "CANDIDATES": samples(40)[1][:, :5]}, {}, r"CANDIDATES has shape \(40, 5\)"),
        ({"HISTORY": samples(40)[0], "CANDIDATES": samples(39)[1]}, {}, "40 rows but CANDIDATES has 39"),
        (dict(zip(("HISTORY", "CANDIDATES"), samples(5), strict=True)), {}, "5 calibration rows are fewer than"),
        (dict(zip(("HISTORY", "CANDIDATES"), samples(40), strict=True)), {"batch_size": 0}, "must be positive"),
    ],
)
def test_bad_calibration_samples_are_config_errors(
    tmp_path: Path, arrays: dict[str, np.ndarray], kwargs: dict[str, int], message: str
) -> None:
    np.savez(tmp_path / "samples.npz", **arrays)
    with pytest.raises(ConfigError, match=message):
        CalibrationBatches.from_npz(tmp_path / "samples.npz", history_len=L, num_candidates=C,
                                    **{"batch_size": 10, **kwargs})  # fmt: skip


def test_unreadable_samples_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "samples.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot read calibration samples"):
        CalibrationBatches.from_npz(tmp_path / "samples.npz", history_len=L, num_candidates=C, batch_size=4)


# ------------------------------------------------------------------------------------- spec
def test_spec_shapes_vary_the_batch_and_fix_the_bundles_columns() -> None:
    spec = EngineSpec(history_len=50, num_candidates=100)
    assert spec.shapes() == {
        "HISTORY": ((1, 50), (16, 50), (64, 50)),
        "CANDIDATES": ((1, 100), (16, 100), (64, 100)),
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "precision must be one of fp32, fp16, int8"),
        ({"opt_batch": 128}, "1 <= min <= opt <= max"),
        ({"min_batch": 0}, "1 <= min <= opt <= max"),
        ({"history_len": 0}, "must be positive"),
    ],
)
def test_bad_specs_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineSpec(**{"history_len": 50, "num_candidates": 100, **kwargs})  # type: ignore[arg-type]


# ------------------------------------------------------------------------- missing TensorRT / GPU
def test_without_tensorrt_the_build_is_a_clear_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what an absent package looks like to import
    with pytest.raises(ConfigError, match="tensorrt Python package is not installed") as err:
        build_engine(tmp_path / "ranker.onnx", tmp_path / "model.plan", EngineSpec(history_len=L, num_candidates=C))
    assert "--trtexec" in str(err.value)
    assert not (tmp_path / "model.plan").exists()


def test_without_a_gpu_the_build_is_a_clear_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.5.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible to this process \(CUDA_VISIBLE_DEVICES=''\)"):
        build_engine(tmp_path / "ranker.onnx", tmp_path / "model.plan", EngineSpec(history_len=L, num_candidates=C))


# ------------------------------------------------------------------------------------- trtexec
def test_trtexec_command_for_fp16() -> None:
    spec = EngineSpec(history_len=50, num_candidates=100, workspace_mib=2048)
    assert trtexec_command(Path("/opt/trt/trtexec"), Path("v/model.onnx"), Path("v/model.plan"), spec) == [
        "/opt/trt/trtexec",
        "--onnx=v/model.onnx",
        "--saveEngine=v/model.plan",
        "--minShapes=HISTORY:1x50,CANDIDATES:1x100",
        "--optShapes=HISTORY:16x50,CANDIDATES:16x100",
        "--maxShapes=HISTORY:64x50,CANDIDATES:64x100",
        "--memPoolSize=workspace:2048",
        "--skipInference",
        "--fp16",
    ]


def test_trtexec_command_for_fp32_has_no_precision_flags() -> None:
    spec = EngineSpec(history_len=5, num_candidates=9, precision="fp32", min_batch=2, opt_batch=4, max_batch=8)
    command = trtexec_command(Path("trtexec"), Path("m.onnx"), Path("m.plan"), spec)
    assert "--minShapes=HISTORY:2x5,CANDIDATES:2x9" in command and "--maxShapes=HISTORY:8x5,CANDIDATES:8x9" in command
    assert not [arg for arg in command if arg in ("--fp16", "--int8") or arg.startswith("--calib")]


def test_trtexec_int8_reads_a_calibration_cache_and_refuses_to_run_without_one() -> None:
    spec = EngineSpec(history_len=50, num_candidates=100, precision="int8")
    command = trtexec_command(Path("trtexec"), Path("m.onnx"), Path("m.plan"), spec,
                              calibration_cache=Path("m.plan.calibration"))  # fmt: skip
    assert command[-3:] == ["--fp16", "--int8", "--calib=m.plan.calibration"]
    with pytest.raises(ConfigError, match=r"trtexec cannot calibrate INT8 on samples\.npz"):
        trtexec_command(Path("trtexec"), Path("m.onnx"), Path("m.plan"), spec)


@pytest.mark.parametrize(
    ("banner", "version"),
    [("v8601", "8.6.1"), ("v100500", "10.5.0"), ("v101600", "10.16.0"), ("v11.1.0.106", "11.1.0.106")],
)
def test_trtexec_log_gives_the_tensorrt_version_and_the_gpu(banner: str, version: str) -> None:
    log = (
        f"&&&& RUNNING TensorRT.trtexec [TensorRT {banner}] [b27] # trtexec --onnx=m.onnx\n"
        "[11/24/2026-10:00:00] [I] === Device Information ===\n"
        "[11/24/2026-10:00:00] [I] Selected Device: NVIDIA H100 80GB HBM3\n"
        "[11/24/2026-10:00:00] [I] Compute Capability: 9.0\n"
    )
    assert parse_trtexec_output(log) == (version, "NVIDIA H100 80GB HBM3")
    assert parse_trtexec_output("nothing useful") == ("unknown", "unknown")


# --------------------------------------------------------------------------- build-engine (CLI)
STAND_IN = """#!/bin/sh
# Stand-in trtexec: records its argv, writes the engine, prints the lines recsvc reads from the real one.
printf '%s\\n' "$@" > "$(dirname "$0")/argv"
for arg in "$@"; do
  case "$arg" in --saveEngine=*) printf 'engine' > "${arg#--saveEngine=}" ;; esac
done
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100500] [b18] # trtexec $*"
echo "[I] Selected Device: NVIDIA L4"
exit "${TRTEXEC_STATUS:-0}"
"""


@pytest.fixture
def trtexec(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "trtexec"
    path.parent.mkdir()
    path.write_text(STAND_IN)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    write_tiny_bundle(tmp_path / "bundle", num_items=30, dim=4, history_len=L, num_candidates=C, seed=2)
    history, candidates = samples(40)
    np.savez(tmp_path / "bundle" / "samples.npz", HISTORY=history % 30, CANDIDATES=candidates % 30)
    update_manifest(tmp_path / "bundle")
    return tmp_path / "bundle"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recsvc")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_build_engine_with_trtexec_writes_the_plan_and_its_json_for_a_published_version(
    tmp_path: Path, bundle: Path, trtexec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = version_dir(tmp_path / "repo", "ranker", publish(bundle, tmp_path / "repo"))
    assert cli("build-engine", str(version), "--trtexec", str(trtexec), "--opt-batch", "8") == 0
    plan = version / "model.plan"                 # where ranker_gpu.pbtxt's default_model_filename points
    assert plan.read_bytes() == b"engine"
    argv = (trtexec.parent / "argv").read_text().splitlines()
    assert argv[0] == f"--onnx={version / 'model.onnx'}"
    assert f"--optShapes=HISTORY:8x{L},CANDIDATES:8x{C}" in argv and "--fp16" in argv
    info = json.loads(info_path(plan).read_text())
    assert info["tensorrt_version"] == "10.5.0" and info["gpu"] == "NVIDIA L4"
    assert info["precision"] == "fp16" and info["batch"] == [1, 8, 64]
    assert (info["history_len"], info["num_candidates"]) == (L, C)
    assert info["builder"] == f"trtexec {trtexec}" and info["build_seconds"] >= 0
    assert info["onnx_sha256"] == read_manifest(version / "bundle").files["ranker.onnx"]
    assert read_engine_info(plan) is not None and read_engine_info(plan).gpu == "NVIDIA L4"  # type: ignore[union-attr]
    assert f"{plan}: fp16 engine for NVIDIA L4 (TensorRT 10.5.0" in capsys.readouterr().out
    assert [p.name for p in version.iterdir() if p.name.startswith(".")] == []      # no temporary left


def test_a_failing_trtexec_is_a_config_error_and_leaves_no_plan(
    bundle: Path, trtexec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRTEXEC_STATUS", "3")
    with pytest.raises(ConfigError, match="failed with status 3"):
        cli("build-engine", str(bundle), "--trtexec", str(trtexec))
    assert sorted(p.name for p in bundle.iterdir() if "plan" in p.name) == []


def test_trtexec_int8_uses_the_cache_an_earlier_python_api_build_wrote(bundle: Path, trtexec: Path) -> None:
    source = resolve_source(bundle)
    spec = EngineSpec(history_len=L, num_candidates=C, precision="int8")
    with pytest.raises(ConfigError, match="trtexec cannot calibrate INT8"):
        build_engine_for(source, spec, trtexec=trtexec)
    calibration_cache_path(source.plan).write_bytes(b"TRT-10050-EntropyCalibration2\n")
    plan, info = build_engine_for(source, spec, trtexec=trtexec)
    assert f"--calib={calibration_cache_path(plan)}" in (trtexec.parent / "argv").read_text().splitlines()
    assert info.precision == "int8"


def test_python_api_int8_without_samples_is_a_config_error(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "b", num_items=30, dim=4, history_len=L, num_candidates=C)
    with pytest.raises(ConfigError, match=r"calibrated on the bundle's samples\.npz"):
        build_engine_for(resolve_source(tmp_path / "b"), EngineSpec(history_len=L, num_candidates=C, precision="int8"))


def test_python_api_build_on_this_host_says_what_is_missing(bundle: Path) -> None:
    # This CI host has neither TensorRT nor a GPU; a host with both builds for real (tests/gpu).
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorrt Python package is not installed"):
            cli("build-engine", str(bundle), "--precision", "int8")
    else:
        pytest.skip("tensorrt is installed here; tests/gpu builds real engines")


def test_sources_are_bundles_or_versions(tmp_path: Path, bundle: Path) -> None:
    source = resolve_source(bundle)
    assert source.onnx == bundle / "ranker.onnx" and source.samples == bundle / "samples.npz"
    assert source.plan == bundle / "model.plan" and source.manifest.history_len == L
    version = version_dir(tmp_path / "repo", "ranker", publish(bundle, tmp_path / "repo"))
    source = resolve_source(version)
    assert (source.onnx, source.samples, source.plan) == (version / "model.onnx", version / "bundle" / "samples.npz",
                                                          version / "model.plan")  # fmt: skip
    with pytest.raises(ConfigError, match="neither a bundle"):
        resolve_source(tmp_path / "repo")
    (version / "model.onnx").unlink()
    with pytest.raises(ConfigError, match=r"no model\.onnx"):
        resolve_source(version)


# ------------------------------------------------------------------------- configs per bundle
@pytest.mark.parametrize("flavour", ["cpu", "gpu", "gpu-onnx", "gpu-torch"])
def test_config_for_bundle_sets_the_warmup_dims_and_keeps_the_rest(flavour: str, bundle: Path) -> None:
    text = config_for_bundle(flavour, read_manifest(bundle))
    rendered = text_format.Parse(text, mc.ModelConfig())
    template = text_format.Parse(config_template(flavour), mc.ModelConfig())
    for sample in rendered.model_warmup:
        assert {k: list(v.dims) for k, v in sample.inputs.items()} == {"HISTORY": [L], "CANDIDATES": [C]}
    del rendered.model_warmup[:], template.model_warmup[:]
    assert rendered == template
    assert text.count("#") == config_template(flavour).count("#")        # the comments survive


def test_config_for_bundle_refuses_a_template_whose_warmup_it_cannot_find(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publishing, "config_template", lambda flavour: 'backend: "python"\nmax_batch_size: 64\n')
    with pytest.raises(ConfigError, match="has 0 warm-up samples"):
        config_for_bundle("cpu", read_manifest(bundle))


@pytest.mark.integration
async def test_the_real_tritonserver_needs_warmup_dims_that_match_the_bundle(tmp_path: Path) -> None:
    """A failed warm-up sample fails the load (Triton 2.51): the default L = 50 config refuses an L = 10 ranker.

    The refusal shows as exit status 1 with "failed to run warmup sample" or, in about half the runs here, as
    a crash (-11) of tritonserver while it tears the failed model down; either way it does not serve.
    """
    import torch

    from recsvc.errors import RankerUnavailable
    from recsvc.offline.models import RankerNet, RetrievalNet
    from recsvc.offline.models.export import export_ranker
    from tests.integration.triton_fixture import running_triton

    write_tiny_bundle(tmp_path / "b", num_items=40, dim=4, history_len=10, num_candidates=100)
    torch.manual_seed(0)
    export_ranker(RankerNet(RetrievalNet(40, 4, 10), dim=4, hidden=8), 10, 100, tmp_path / "b" / "ranker.onnx")
    update_manifest(tmp_path / "b")        # an exported ranker fixes L: HISTORY is [B, 10]
    repo = tmp_path / "repo"
    publish(tmp_path / "b", repo)
    # publish shapes the warm-up like the bundle; put the unshaped template (L = 50) back to see the refusal.
    (repo / "ranker" / "config.pbtxt").write_text(config_template("cpu"))
    with pytest.raises(RankerUnavailable, match="during start-up") as refused:
        async with running_triton(repo, startup_timeout_s=60):
            pass
    assert "failed to run warmup sample 'one-row'" in str(refused.value) or "status -11" in str(refused.value)
    (repo / "ranker" / "config.pbtxt").write_text(config_for_bundle("cpu", read_manifest(tmp_path / "b")))
    async with running_triton(repo, startup_timeout_s=60) as (server, _):
        assert server.pid is not None
        assert [line for line in server.log_tail().splitlines() if line.startswith("E")] == []


def test_registering_the_command_imports_neither_torch_nor_tritonclient() -> None:
    # Every `recsvc` command builds the whole parser: build-engine must not make them all pay for torch.
    code = ("import sys, argparse; from recsvc.offline.engines import register; "
            "register(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'tritonclient', 'tensorrt') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert engines.PRECISIONS == PRECISIONS


def test_engine_info_round_trips(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    assert read_engine_info(plan) is None
    info_path(plan).write_bytes(orjson.dumps({"not": "an engine info"}))
    assert read_engine_info(plan) is None
