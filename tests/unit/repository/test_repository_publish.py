from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

import recsvc.repository.publishing as publish_module
from recsvc.bundle import read_manifest, verify_bundle, write_manifest
from recsvc.errors import BundleError, ConfigError
from recsvc.ranking.tiny import random_embeddings, write_tiny_ranker
from recsvc.repository import (
    STAGING_PREFIX,
    latest_version,
    list_versions,
    publish,
    version_dir,
)
from recsvc.repository.publishing import config_for_bundle, write_config
from recsvc.repository.tiny_bundle import write_tiny_bundle

RANKER_MODEL_SOURCE = Path(publish_module.__file__).with_name("ranker_model.py")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    write_tiny_bundle(directory, num_items=30, dim=4, history_len=5, num_candidates=7)
    return directory


def entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir())


def test_first_publish_is_version_1_with_model_onnx_and_bundle(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    assert publish(bundle, repo) == 1
    v1 = version_dir(repo, "ranker", 1)
    assert sorted(p.name for p in v1.iterdir()) == ["bundle", "model.onnx", "model.py", "model_torch.py"]
    assert (v1 / "model.py").read_bytes() == RANKER_MODEL_SOURCE.read_bytes()
    assert (v1 / "model.onnx").read_bytes() == (bundle / "ranker.onnx").read_bytes()
    assert verify_bundle(v1 / "bundle") == read_manifest(bundle)
    # A fresh repository gets the packaged CPU config, shared by all versions.
    # The cpu template, its warm-up shaped like this bundle.
    assert (repo / "ranker" / "config.pbtxt").read_text() == config_for_bundle("cpu", read_manifest(bundle))
    assert entries(repo / "ranker") == ["1", "config.pbtxt"]


def test_versions_count_up_and_existing_config_is_kept(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text("# mine\n")
    assert [publish(bundle, repo, "other") for _ in range(3)] == [1, 2, 3]
    assert list_versions(repo, "other") == [1, 2, 3]
    assert latest_version(repo, "other") == 3
    assert (repo / "other" / "config.pbtxt").read_text() == "# mine\n"
    assert list_versions(repo) == [] and latest_version(repo) is None  # model "ranker" untouched


def test_list_versions_only_counts_complete_numeric_directories(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    model_dir = repo / "ranker"
    (model_dir / "7").mkdir()  # numeric, but no bundle/manifest.json
    (model_dir / f"{STAGING_PREFIX}8" / "bundle").mkdir(parents=True)
    (model_dir / f"{STAGING_PREFIX}8" / "bundle" / "manifest.json").write_text("{}")
    (model_dir / "v9" / "bundle").mkdir(parents=True)
    (model_dir / "v9" / "bundle" / "manifest.json").write_text("{}")
    assert list_versions(repo) == [1]
    assert latest_version(repo) == 1
    assert list_versions(tmp_path / "nowhere") == []


def test_a_number_already_on_disk_is_never_reused(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "ranker" / "5").mkdir(parents=True)  # e.g. a half-deleted version Triton saw
    assert publish(bundle, repo) == 6


def test_leftover_staging_from_a_crash_is_removed(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    leftover = repo / "ranker" / f"{STAGING_PREFIX}2"
    (leftover / "bundle").mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    assert publish(bundle, repo) == 2
    assert entries(repo / "ranker") == ["1", "2", "config.pbtxt"]
    assert (repo / "ranker" / "2" / "model.onnx").read_bytes() == (bundle / "ranker.onnx").read_bytes()


def test_staging_is_never_visible_as_a_version_and_a_failure_leaves_nothing(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    seen: list[tuple[list[str], list[int]]] = []

    def fail_after_writing(root: Path) -> None:
        # Everything is written but not yet renamed: only the staging name exists, no version 2.
        seen.append((entries(root.parent), list_versions(repo)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish_module, "_fsync_tree", fail_after_writing)
    with pytest.raises(ConfigError, match="No space left"):
        publish(bundle, repo)
    assert seen == [([f"{STAGING_PREFIX}2", "1", "config.pbtxt"], [1])]
    assert entries(repo / "ranker") == ["1", "config.pbtxt"]


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: publish(bundle, repo), range(4)))
    assert sorted(versions) == [1, 2, 3, 4]
    assert list_versions(repo) == [1, 2, 3, 4]


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_tampered_bundle_is_refused_and_nothing_is_written(tmp_path: Path, bundle: Path) -> None:
    broken = copy_bundle(bundle, tmp_path / "broken")
    np.save(broken / "popularity.npy", np.zeros(30, dtype=np.float32))  # checksum no longer matches
    with pytest.raises(BundleError, match=r"popularity\.npy checksum"):
        publish(broken, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_directory_without_manifest_is_refused(tmp_path: Path, bundle: Path) -> None:
    broken = copy_bundle(bundle, tmp_path / "broken")
    (broken / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest"):
        publish(broken, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_missing_file_is_refused_and_existing_versions_are_untouched(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    broken = copy_bundle(bundle, tmp_path / "broken")
    (broken / "item_embeddings.npy").unlink()
    with pytest.raises(BundleError, match=r"item_embeddings\.npy is missing"):
        publish(broken, repo)
    assert entries(repo / "ranker") == ["1", "config.pbtxt"]


def test_ranker_without_the_contract_tensors_is_refused(tmp_path: Path, bundle: Path) -> None:
    broken = copy_bundle(bundle, tmp_path / "broken")
    model = onnx.load(str(broken / "ranker.onnx"))
    model.graph.output[0].name = "LOGITS"
    model.graph.node[-1].output[0] = "LOGITS"
    onnx.save(model, str(broken / "ranker.onnx"))
    manifest = read_manifest(bundle)
    write_manifest(
        broken, dataset=manifest.dataset, created_at=manifest.created_at, num_items=manifest.num_items,
        dim=manifest.dim, history_len=manifest.history_len, num_candidates=manifest.num_candidates,
        metrics={}, extra={},
    )  # fmt: skip
    with pytest.raises(BundleError, match="output SCORES"):
        publish(broken, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_ranker_with_fixed_dims_that_contradict_the_manifest_is_refused(tmp_path: Path, bundle: Path) -> None:
    broken = copy_bundle(bundle, tmp_path / "broken")
    write_tiny_ranker(broken / "ranker.onnx", random_embeddings(30, 4))
    model = onnx.load(str(broken / "ranker.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 99  # HISTORY [B, 99]; manifest says 5
    onnx.save(model, str(broken / "ranker.onnx"))
    manifest = read_manifest(bundle)
    write_manifest(
        broken, dataset=manifest.dataset, created_at=manifest.created_at, num_items=manifest.num_items,
        dim=manifest.dim, history_len=manifest.history_len, num_candidates=manifest.num_candidates,
        metrics={}, extra={},
    )  # fmt: skip
    with pytest.raises(BundleError, match="HISTORY has 99 columns"):
        publish(broken, tmp_path / "repo")


def test_unwritable_repository_is_a_config_error(tmp_path: Path, bundle: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot publish"):
        publish(bundle, blocker / "repo")


def test_target_picks_the_config_and_render_config_switches_it(tmp_path: Path, tiny_bundle: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from recsvc.cli import main

    repo = tmp_path / "repo"
    publish(tiny_bundle, repo, target="gpu-torch")
    config = text_format.Parse((repo / "ranker" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.backend == "python" and config.default_model_filename == "model_torch.py"
    # Warm-up shaped like this bundle (L=10, C=20), not the templates' defaults.
    dims = {name: list(t.dims) for sample in config.model_warmup for name, t in sample.inputs.items()}
    assert dims == {"HISTORY": [10], "CANDIDATES": [20]}
    publish(tiny_bundle, repo, target="gpu")                      # an existing config is kept
    assert "model_torch.py" in (repo / "ranker" / "config.pbtxt").read_text()
    assert main(["render-config", "--model-repository", str(repo), "--target", "gpu"]) == 0
    config = text_format.Parse((repo / "ranker" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.platform == "tensorrt_plan"
    assert write_config(tmp_path / "other", "cpu", read_manifest(tiny_bundle)).is_file()
