"""A model bundle: everything one model version needs, versioned together.

A bundle is a directory written by ``recsvc train``::

    manifest.json          format, dataset, sizes, metrics, and the sha256 of every other file
    items.parquet          the catalog; row i is dense item id i (columns item_id, title, category)
    item_embeddings.npy    float32 [num_items, dim]: what the retrieval index is built from
    query_encoder.onnx     HISTORY int64 [B, L] -> QUERY float32 [B, dim]
    ranker.onnx            HISTORY int64 [B, L], CANDIDATES int64 [B, C] -> SCORES float32 [B, C]
    popularity.npy         float32 [num_items]: training interaction counts, for cold fallbacks
    queries.npy            optional float32 [Q, dim]: held-out users' query vectors (index recall is measured on them)
    ranker.pt              optional: the ranker as TorchScript (the gpu-torch target runs it in FP16 on CUDA)
    samples.npz            optional: real ranker inputs HISTORY [N, L] and CANDIDATES [N, C] (INT8 calibration,
                           the publish canary, latency benchmarks)
    index/index.faiss      optional: the item index built by ``recsvc build-index`` (see retrieval/index_build.py)
    index/index.json       optional: its kind, search parameters and measured recall

Model inputs use dense item ids with -1 as padding; histories are oldest first, padded on the left, so
the most recent item is always in the last column. ``recsvc publish`` copies a bundle into a Triton
version directory so the ranker version and the item index that belongs to it switch together.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from recsvc.errors import BundleError

__all__ = [
    "BUNDLE_FILES",
    "FORMAT_VERSION",
    "MANIFEST",
    "OPTIONAL_FILES",
    "PADDING_SCORE",
    "Manifest",
    "load_array",
    "read_manifest",
    "sha256_file",
    "update_manifest",
    "update_metrics",
    "verify_bundle",
    "write_manifest",
]

FORMAT_VERSION = 1
# SCORES of padded candidate slots (-1): far below any real score, yet finite so FP16 engines and
# downstream sorting never meet infinities or NaNs. Every ranker backend must honour it.
PADDING_SCORE = -1e4
MANIFEST = "manifest.json"
BUNDLE_FILES = (
    "items.parquet",
    "item_embeddings.npy",
    "query_encoder.onnx",
    "ranker.onnx",
    "popularity.npy",
)
# Checksummed like the rest whenever present.
# item2item.npz, blend.onnx, item_stats.npy: the item-to-item source and the blend stage (recsvc.ranking.blend).
OPTIONAL_FILES = ("queries.npy", "samples.npz", "ranker.pt", "index/index.faiss", "index/index.json", "item2item.npz",
                  "blend.onnx", "item_stats.npy")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a bundle holds and how it was made."""

    format: int
    dataset: str
    created_at: str
    num_items: int
    dim: int
    history_len: int
    num_candidates: int
    files: dict[str, str]          # relative file name -> sha256 hex
    metrics: dict[str, float]
    extra: dict[str, Any]

    def to_json(self) -> bytes:
        """Serialise (stable key order, indented for people reading it)."""
        return orjson.dumps(self.__dict__, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large embedding files do not sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, **fields: Any) -> Manifest:
    """Checksum the bundle files in ``directory`` and write manifest.json last."""
    missing = [name for name in BUNDLE_FILES if not (directory / name).is_file()]
    if missing:
        raise BundleError(f"cannot write manifest in {directory}: missing {', '.join(missing)}")
    manifest = Manifest(format=FORMAT_VERSION, files=_checksums(directory), **fields)
    (directory / MANIFEST).write_bytes(manifest.to_json())
    return manifest


def _checksums(directory: Path) -> dict[str, str]:
    names = [*BUNDLE_FILES, *(name for name in OPTIONAL_FILES if (directory / name).is_file())]
    return {name: sha256_file(directory / name) for name in names}


def update_manifest(directory: Path, *, extra: dict[str, Any] | None = None) -> Manifest:
    """Re-checksum the bundle's files (after e.g. an index was added) and merge ``extra``; atomic."""
    manifest = read_manifest(directory)
    updated = Manifest(**{**manifest.__dict__, "files": _checksums(directory),
                          "extra": {**manifest.extra, **(extra or {})}})  # fmt: skip
    _replace_manifest(directory, updated)
    return updated


def _replace_manifest(directory: Path, manifest: Manifest) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_bytes(manifest.to_json())
    tmp.replace(directory / MANIFEST)


def read_manifest(directory: Path) -> Manifest:
    """Read and type-check manifest.json (checksums are not verified; see ``verify_bundle``).

    Every name in ``files`` must be a plain relative path inside the bundle: a manifest naming
    ``../x`` or ``/etc/x`` is refused, so checking, copying or loading a bundle never reaches outside it.
    """
    path = directory / MANIFEST
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"{directory} is not a bundle: no {MANIFEST}") from exc
    except NotADirectoryError as exc:
        raise BundleError(f"{directory} is not a bundle: a bundle is a directory (with {MANIFEST})") from exc
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: unsupported bundle format {raw.get('format') if isinstance(raw, dict) else raw!r}")
    try:
        manifest = Manifest(**raw)
    except TypeError as exc:
        raise BundleError(f"{path}: malformed manifest ({exc})") from exc
    _check_files(path, manifest.files)
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_files(path: Path, files: object) -> None:
    if not isinstance(files, dict):
        raise BundleError(f"{path}: 'files' must map file names to sha256 checksums")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"{path}: checksum of {name!r} is not a sha256 hex digest")
        pure = PurePosixPath(name) if isinstance(name, str) else None
        if (pure is None or not name or pure.is_absolute() or ".." in pure.parts or "\\" in name
                or "\0" in name or pure.as_posix() != name):  # fmt: skip
            raise BundleError(f"{path}: file name {name!r} is not a plain relative path inside the bundle")


def verify_bundle(directory: Path) -> Manifest:
    """Read the manifest and check every file's checksum; raise BundleError on any mismatch.

    The required files must be listed (a manifest cannot opt out of checking its ranker), and every file
    must resolve inside the bundle (a symlink out of it is refused like a ``../`` name).
    """
    manifest = read_manifest(directory)
    unlisted = [name for name in BUNDLE_FILES if name not in manifest.files]
    if unlisted:
        raise BundleError(f"bundle {directory}: manifest lists no checksum for {', '.join(unlisted)}")
    root = directory.resolve()
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.resolve().is_relative_to(root):
            raise BundleError(f"bundle {directory}: file {name} resolves outside the bundle")
        if not path.is_file():
            raise BundleError(f"bundle {directory}: file {name} is missing")
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"bundle {directory}: file {name} is unreadable: {exc}") from exc
        if actual != expected:
            raise BundleError(f"bundle {directory}: {name} checksum {actual[:12]} != manifest {expected[:12]}")
    return manifest


def load_array(path: Path) -> npt.NDArray[Any]:
    """``np.load`` of one ``.npy`` file; a truncated or garbage file is a BundleError naming it."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # numpy: short reads, bad headers, pickled data
        raise BundleError(f"{path} is not a readable .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise BundleError(f"{path} holds {type(array).__name__}, not one .npy array")
    return array


def update_extra(directory: Path, extra: dict[str, Any]) -> Manifest:
    """Merge ``extra`` into an existing bundle's manifest ``extra`` (files and checksums unchanged)."""
    manifest = read_manifest(directory)
    updated = Manifest(**{**manifest.__dict__, "extra": {**manifest.extra, **extra}})
    _replace_manifest(directory, updated)
    return updated


def update_metrics(directory: Path, metrics: dict[str, float]) -> Manifest:
    """Record evaluation metrics in an existing bundle's manifest (files and checksums unchanged)."""
    manifest = read_manifest(directory)
    updated = Manifest(**{**manifest.__dict__, "metrics": {**manifest.metrics, **metrics}})
    _replace_manifest(directory, updated)
    return updated
