"""Publish model bundles into a Triton model repository as numbered, immutable versions.

Layout of one model (``repository/<model>/``)::

    config.pbtxt          shared by all versions (written from templates/ranker_cpu.pbtxt if missing)
    1/                    one complete version
        model.py          copy of recsvc/repository/ranker_model.py (Triton's python backend runs it)
        model_torch.py    copy of recsvc/repository/model_torch.py (the gpu-torch target runs it)
        model.onnx        copy of the bundle's ranker.onnx
        bundle/           the whole bundle: the service loads the item index from here, so the ranker
                          version and the index that belongs to it switch together
    2/ ...
    .staging-3/           a version being written; renamed to 3/ only when complete

A version directory appears in one atomic ``rename`` after every file is written and fsynced, so Triton
(or a service scanning for the newest version) never sees half a version. ``model.onnx`` is what Triton
loads, so it is checked against the bundle's checksum of ``ranker.onnx`` (``verify_version``) whenever
Triton is about to load it: at publish, before a rollout's pre-flight, and before every re-pin. A file
damaged after publishing (a bad copy, a disk error, a hand edit) is refused instead of served.
Publishers are serialised by an ``flock`` on the model directory, so two concurrent ``publish`` calls get
different numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np

from recsvc.bundle import MANIFEST, Manifest, sha256_file, verify_bundle
from recsvc.durable import fsync_dir, fsync_file
from recsvc.errors import BundleError, ConfigError

__all__ = [
    "STAGING_PREFIX",
    "config_for_bundle",
    "config_template",
    "fit_warmup",
    "latest_version",
    "list_versions",
    "publish",
    "verify_version",
    "version_dir",
    "write_config",
]

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
_NUMERIC = re.compile(r"[0-9]+")
_RANKER_INPUTS = ("HISTORY", "CANDIDATES")
_RANKER_OUTPUT = "SCORES"
MODEL_FILE = "model.onnx"     # the bundle's ranker.onnx as Triton's python backend loads it


def config_template(flavour: str = "cpu") -> str:
    """Text of the packaged ranker config for ``flavour`` (one Triton target per template).

    "cpu": python backend + ONNX Runtime; "gpu": TensorRT engine; "gpu-onnx": onnxruntime backend with the
    TensorRT accelerator; "gpu-torch": python backend running TorchScript on CUDA.
    """
    flavours = ("cpu", "gpu", "gpu-onnx", "gpu-torch")
    source = resources.files("recsvc.repository").joinpath("templates", f"ranker_{flavour.replace('-', '_')}.pbtxt")
    if flavour not in flavours or not source.is_file():
        raise ConfigError(f"no ranker config template for flavour {flavour!r} (known: {', '.join(flavours)})")
    return source.read_text(encoding="utf-8")


def version_dir(repository: Path, model_name: str, version: int) -> Path:
    """Directory of one published version."""
    return repository / model_name / str(version)


def list_versions(repository: Path, model_name: str = "ranker") -> list[int]:
    """Complete versions of ``model_name``, ascending: numeric directories holding bundle/manifest.json."""
    model_dir = repository / model_name
    if not model_dir.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in model_dir.iterdir()
        if _NUMERIC.fullmatch(entry.name) and (entry / "bundle" / MANIFEST).is_file()
    )


def verify_version(directory: Path) -> Manifest:
    """Check a published version before Triton loads it or the service serves it; return its manifest.

    The bundle's files must match its manifest (``verify_bundle``) and ``model.onnx`` must be the
    bundle's ``ranker.onnx`` byte for byte (its sha256 is in the manifest). Raises BundleError naming the
    file otherwise. Blocking and proportional to the version's size (it hashes every file): call it in a
    thread.
    """
    manifest = verify_bundle(directory / "bundle")
    model = directory / MODEL_FILE
    try:
        actual = sha256_file(model)
    except FileNotFoundError as exc:
        raise BundleError(f"version {directory}: {MODEL_FILE} is missing") from exc
    except OSError as exc:
        raise BundleError(f"version {directory}: {MODEL_FILE} is unreadable: {exc}") from exc
    expected = manifest.files["ranker.onnx"]
    if actual != expected:
        raise BundleError(f"version {directory}: {MODEL_FILE} checksum {actual[:12]} != the bundle's ranker.onnx "
                          f"{expected[:12]}: damaged after publishing, refusing to load it")  # fmt: skip
    return manifest


def latest_version(repository: Path, model_name: str = "ranker") -> int | None:
    """Newest complete version, or None when nothing has been published."""
    versions = list_versions(repository, model_name)
    return versions[-1] if versions else None


def publish(bundle_dir: Path, repository: Path, model_name: str = "ranker", *, target: str = "cpu") -> int:
    """Copy a verified bundle into the repository as the next version; return its number.

    ``target`` picks the config.pbtxt written when the model has none yet (see ``config_template``); an
    existing config is kept (``write_config`` changes it). Raises BundleError (and writes nothing) when
    the bundle fails verification or its ranker does not
    have the model contract's tensors; ConfigError when the repository cannot be written.
    """
    manifest = verify_bundle(bundle_dir)
    _check_ranker(bundle_dir / "ranker.onnx", manifest)
    model_dir = repository / model_name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with _locked(model_dir):
            _remove_leftover_staging(model_dir)
            if not (model_dir / "config.pbtxt").exists():
                write_config(model_dir, target, manifest)
            version = _next_version(model_dir)
            staging = model_dir / f"{STAGING_PREFIX}{version}"
            try:
                _write_version(staging, bundle_dir)
                # rename(2) is atomic within a filesystem: the version appears complete or not at all.
                staging.rename(model_dir / str(version))
                fsync_dir(model_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except OSError as exc:
        raise ConfigError(f"cannot publish {bundle_dir} into {model_dir}: {exc}") from exc
    log.info("published %s as %s version %d", bundle_dir, model_name, version)
    return version


def _check_ranker(path: Path, manifest: Manifest) -> None:
    """Refuse a ranker Triton would fail to serve, before anything is written."""
    # Here, not at the top: only publish reads the graph, and serving processes need not load onnx.
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf, not one base type
        raise BundleError(f"{path} is not a readable ONNX model: {exc}") from exc
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    missing = [name for name in _RANKER_INPUTS if name not in inputs]
    if missing or _RANKER_OUTPUT not in outputs:
        raise BundleError(
            f"{path}: ranker must have inputs {list(_RANKER_INPUTS)} and output {_RANKER_OUTPUT}; "
            f"has inputs {sorted(inputs)}, outputs {sorted(outputs)}"
        )
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        # The file is copied as model.onnx; weights in a side file would be left behind.
        raise BundleError(f"{path}: weights stored as external data are not supported; export with them inline")
    for init in model.graph.initializer:
        # A NaN or infinite weight loads fine and turns every score it touches into NaN.
        weights = numpy_helper.to_array(init)
        if weights.dtype.kind in "fc" and not np.isfinite(weights).all():
            raise BundleError(f"{path}: weight {init.name!r} has NaN or infinite values")
    expected = {"HISTORY": manifest.history_len, "CANDIDATES": manifest.num_candidates}
    for name, size in expected.items():
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value != size:
            raise BundleError(f"{path}: {name} has {dims[1].dim_value} columns but the manifest says {size}")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive flock on the directory itself: no lock file for Triton to trip over."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_leftover_staging(model_dir: Path) -> None:
    # Under the lock no other publisher is writing, so any staging directory is a crash's leftover.
    for entry in model_dir.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            log.warning("removing leftover %s from an interrupted publish", entry)
            shutil.rmtree(entry)


_WARMUP_DIMS = {
    name: re.compile(r'(key:\s*"' + name + r'"\s*value:\s*\{[^}]*?dims:\s*\[\s*)\d+(\s*\])')
    for name in ("HISTORY", "CANDIDATES")
}


def config_for_bundle(flavour: str, manifest: Manifest) -> str:
    """The ``flavour`` template with warm-up dims set to the bundle's history_len and num_candidates.

    The text keeps the template's comments. ConfigError when the template's warm-up samples do not each
    name both inputs (a template edit this function would otherwise silently miss).
    """
    return fit_warmup(config_template(flavour), manifest, what=f"the {flavour} template", required=True)


def fit_warmup(text: str, manifest: Manifest, *, what: str = "the config", required: bool = False) -> str:
    """``text`` (a ranker config.pbtxt) with its warm-up dims set to the bundle's L and C.

    A config without warm-up samples is returned as is unless ``required``.
    """
    sizes = {"HISTORY": manifest.history_len, "CANDIDATES": manifest.num_candidates}
    counts: dict[str, int] = {}
    for name, pattern in _WARMUP_DIMS.items():
        text, counts[name] = pattern.subn(rf"\g<1>{sizes[name]}\g<2>", text)
    samples = len(re.findall(r"^\s*batch_size:", text, flags=re.M))
    if not required and samples == 0 and not any(counts.values()):
        return text
    if samples == 0 or set(counts.values()) != {samples}:
        raise ConfigError(f"{what} has {samples} warm-up samples but warm-up dims {counts}")
    return text



def write_config(model_dir: Path, target: str, manifest: Manifest) -> Path:
    """Write ``target``'s config.pbtxt (warm-up shaped like ``manifest``'s bundle) atomically."""
    text = config_for_bundle(target, manifest)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / ".config.pbtxt.tmp"
    tmp.write_text(text, encoding="utf-8")
    fsync_file(tmp)
    tmp.rename(model_dir / "config.pbtxt")
    return model_dir / "config.pbtxt"


def _next_version(model_dir: Path) -> int:
    # Any numeric directory counts, complete or not: a number Triton may have seen is never reused.
    numbers = [int(e.name) for e in model_dir.iterdir() if _NUMERIC.fullmatch(e.name) and e.is_dir()]
    return max(numbers, default=0) + 1


def _write_version(staging: Path, bundle_dir: Path) -> None:
    staging.mkdir()
    package = resources.files("recsvc.repository")
    (staging / "model.py").write_bytes(package.joinpath("ranker_model.py").read_bytes())
    # The gpu-torch target's python-backend model (its config names it): every version can serve any target.
    (staging / "model_torch.py").write_bytes(package.joinpath("model_torch.py").read_bytes())
    shutil.copyfile(bundle_dir / "ranker.onnx", staging / MODEL_FILE)
    shutil.copytree(bundle_dir, staging / "bundle")
    # Check what Triton and the service will actually read, not just what we meant to copy.
    verify_version(staging)
    _fsync_tree(staging)


def _fsync_tree(root: Path) -> None:
    """Flush every file, then every directory bottom-up, so the rename publishes durable content."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))
