"""Damaged files are refused before Triton loads them or the service serves them (issue 10)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest

from recsvc.bundle import MANIFEST, read_manifest, update_manifest, verify_bundle
from recsvc.cli import main
from recsvc.config import Settings
from recsvc.errors import BundleError
from recsvc.pipeline import load_serving_bundle
from recsvc.repository import publish
from recsvc.repository.publishing import verify_version
from recsvc.repository.rollout import (
    RolloutError,
    ServingState,
    pinnable_versions,
    read_serving,
    reconcile,
    rollout,
    write_serving,
)
from recsvc.repository.tiny_bundle import write_tiny_bundle
from tests.broken_models import DAMAGES, damage_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_tiny_bundle(out, num_items=120, history_len=10, num_candidates=20)
    return out


def _rewrite_manifest(directory: Path, **changes: object) -> None:
    raw = orjson.loads((directory / MANIFEST).read_bytes())
    raw.update(changes)
    (directory / MANIFEST).write_bytes(orjson.dumps(raw))


# ------------------------------------------------------------------------- manifest paths (review 7b)
@pytest.mark.parametrize("name", ["../outside.npy", "/etc/hostname", "a/../../x", "./items.parquet", "a\\..\\b", ""])
def test_manifest_names_outside_the_bundle_are_refused(tmp_path: Path, bundle: Path, name: str) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (tmp_path / "outside.npy").write_bytes(b"x")
    files = read_manifest(copy).files
    _rewrite_manifest(copy, files={**files, name: "0" * 64})
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        read_manifest(copy)
    with pytest.raises(BundleError, match="not a plain relative path"):
        verify_bundle(copy)


def test_a_symlink_out_of_the_bundle_and_an_unlisted_ranker_are_refused(tmp_path: Path, bundle: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    secret = tmp_path / "secret.npy"
    shutil.copyfile(copy / "popularity.npy", secret)
    (copy / "popularity.npy").unlink()
    (copy / "popularity.npy").symlink_to(secret)      # same bytes, same checksum: only its place is wrong
    with pytest.raises(BundleError, match=r"popularity\.npy resolves outside the bundle"):
        verify_bundle(copy)
    (copy / "popularity.npy").unlink()
    shutil.copyfile(secret, copy / "popularity.npy")
    assert verify_bundle(copy).num_items == 120
    files = dict(read_manifest(copy).files)
    del files["ranker.onnx"]                          # a manifest cannot opt its ranker out of checking
    _rewrite_manifest(copy, files=files)
    with pytest.raises(BundleError, match=r"no checksum for ranker\.onnx"):
        verify_bundle(copy)
    _rewrite_manifest(copy, files={**files, "ranker.onnx": "not-a-digest"})
    with pytest.raises(BundleError, match="not a sha256"):
        read_manifest(copy)


# ------------------------------------------------------------------ model.onnx checked before loading
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_model_onnx_still_loads_but_its_version_is_refused(tmp_path: Path, bundle: Path, how: str) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    version = repo / "ranker" / "1"
    assert verify_version(version).num_items == 120
    damage_model(version / "model.onnx", how)          # asserts ONNX Runtime still loads it
    with pytest.raises(BundleError, match=r"model\.onnx checksum .* damaged after publishing"):
        verify_version(version)
    with pytest.raises(BundleError, match=r"model\.onnx checksum"):
        load_serving_bundle(version, "1", Settings(model_repository=repo))
    assert pinnable_versions(repo, "ranker", [1]) == []
    (version / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is missing"):
        verify_version(version)


def test_publish_refuses_nan_weights_even_with_a_matching_manifest(tmp_path: Path, bundle: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    damage_model(copy / "ranker.onnx", "nan")
    update_manifest(copy)                              # checksums agree: only the weights tell
    with pytest.raises(BundleError, match="NaN or infinite"):
        publish(copy, tmp_path / "repo")
    assert not (tmp_path / "repo" / "ranker" / "1").exists()


class AdminTriton:
    """Triton as the rollout and triton-sync see it; records every load."""

    def __init__(self) -> None:
        self.loaded: set[int] = set()
        self.loads: list[list[int]] = []

    async def is_server_ready(self) -> bool:
        return True

    async def loaded_versions(self) -> set[int]:
        return set(self.loaded)

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        self.loads.append(sorted(versions))
        self.loaded = set(versions)

    async def is_model_ready(self, version: str = "") -> bool:
        return int(version) in self.loaded

    async def score(self, history: np.ndarray, candidates: np.ndarray, *, version: str) -> np.ndarray:
        raise AssertionError("a damaged version must never reach the canary")


async def test_rollout_refuses_a_damaged_version_before_triton_sees_it(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    publish(bundle, repo)
    write_serving(repo, "ranker", ServingState(version=1, loaded=(1,)))
    damage_model(repo / "ranker" / "2" / "model.onnx", "overwrite")
    triton = AdminTriton()
    with pytest.raises(RolloutError, match=r"version 2 refused before loading.*model\.onnx checksum"):
        await rollout(repo, "ranker", 2, triton, triton, drain_s=0)
    assert triton.loads == []                          # never loaded
    state = read_serving(repo, "ranker")
    assert state is not None and (state.version, state.loaded, state.refused) == (1, (1,), (2,))


async def test_triton_sync_leaves_a_damaged_version_out(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    publish(bundle, repo)
    write_serving(repo, "ranker", ServingState(version=2, loaded=(1, 2), previous=1))
    damage_model(repo / "ranker" / "1" / "model.onnx", "replace")
    triton = AdminTriton()
    assert await reconcile(repo, "ranker", triton)
    assert triton.loads == [[2]]
    assert not await reconcile(repo, "ranker", triton)   # no reload at every poll while 1 stays damaged
    damage_model(repo / "ranker" / "2" / "model.onnx", "nan")
    triton.loaded = set()                                # a restart
    with pytest.raises(BundleError, match="is damaged; loading none"):
        await reconcile(repo, "ranker", triton)
    assert triton.loads == [[2]]


# --------------------------------------------------------------------- unreadable files at start-up
def _publish_with(tmp_path: Path, bundle: Path, name: str, content: bytes, *, rewrite: bool) -> Path:
    """Publish ``bundle``, then replace ``name`` in the version's bundle (and its manifest if ``rewrite``)."""
    repo = tmp_path / "repo"
    publish(bundle, repo)
    inner = repo / "ranker" / "1" / "bundle"
    (inner / name).write_bytes(content)
    if rewrite:
        update_manifest(inner)
    return repo


def _corrupt(bundle: Path, name: str) -> bytes:
    data = (bundle / name).read_bytes()
    if name.endswith(".npy"):
        return data[: len(data) // 2]                  # truncated
    return b"\x00garbage\xff" * 64                      # not ONNX / not Parquet at all


CORRUPT = ["item_embeddings.npy", "popularity.npy", "query_encoder.onnx", "items.parquet"]


@pytest.mark.parametrize("rewrite", [False, True], ids=["checksum-mismatch", "manifest-rewritten"])
@pytest.mark.parametrize("name", CORRUPT)
def test_an_unreadable_file_is_a_bundle_error_naming_it(tmp_path: Path, bundle: Path, name: str, rewrite: bool) -> None:
    repo = _publish_with(tmp_path, bundle, name, _corrupt(bundle, name), rewrite=rewrite)
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_serving_bundle(repo / "ranker" / "1", "1", Settings(model_repository=repo))


def test_nan_embeddings_with_a_matching_manifest_are_refused(tmp_path: Path, bundle: Path) -> None:
    embeddings = np.load(bundle / "item_embeddings.npy")
    embeddings[3, 2] = np.nan
    path = tmp_path / "e.npy"
    np.save(path, embeddings)
    repo = _publish_with(tmp_path, bundle, "item_embeddings.npy", path.read_bytes(), rewrite=True)
    with pytest.raises(BundleError, match=r"item_embeddings\.npy: float32 with NaN"):
        load_serving_bundle(repo / "ranker" / "1", "1", Settings(model_repository=repo))


@pytest.mark.parametrize("name", CORRUPT)
def test_serve_with_a_corrupt_file_prints_one_line_and_exits_2(
    tmp_path: Path, bundle: Path, name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import recsvc.logs

    # The CLI's log handler would keep this test's captured stderr after it is closed; logs are not checked here.
    monkeypatch.setattr(recsvc.logs, "setup_logging", lambda *args, **kwargs: None)
    repo = _publish_with(tmp_path, bundle, name, _corrupt(bundle, name), rewrite=True)
    status = main(["--log-format", "text", "serve", "--model-repository", str(repo),
                   "--data-dir", str(tmp_path / "var"), "--port", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("recsvc serve:")]
    assert len(lines) == 1 and name in lines[0], err
    assert "Traceback" not in err
