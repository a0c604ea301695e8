"""Per-target files of a ranker version: ``recsvc build-engine`` (the TensorRT plan) and warm-up-aware configs.

``recsvc build-engine SOURCE`` builds the ``gpu`` target's engine from SOURCE, which is either a bundle
(``manifest.json`` + ``ranker.onnx``) or a published version directory (``model.onnx`` +
``bundle/manifest.json``). The plan goes next to the ONNX file as ``model.plan`` unless ``--out`` says
otherwise, so for a version it lands where ranker_gpu.pbtxt's ``default_model_filename`` expects it. See
recsvc/offline/models/tensorrt.py for the two builders (TensorRT Python API, or ``--trtexec PATH``).

``config_for_bundle`` (in recsvc/repository/publishing.py) renders a target's config with warm-up samples
of the bundle's L and C: Triton
needs fixed warm-up dims, and a failed warm-up sample fails the load, so a bundle whose sizes differ from
the templates' defaults (L = 50, C = 100) needs its own text, written as config.pbtxt or passed as the
config override of a load.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsvc.errors import ConfigError

if TYPE_CHECKING:
    from recsvc.bundle import Manifest
    from recsvc.offline.models.tensorrt import EngineInfo, EngineSpec

__all__ = [
    "DESCRIPTION",
    "PRECISIONS",
    "EngineSource",
    "build_engine_for",
    "register",
    "resolve_source",
]

PLAN = "model.plan"
# `recsvc build-engine --help`: what a user needs, not the module's notes.
DESCRIPTION = """\
Build the TensorRT engine (model.plan) of the gpu target from SOURCE, on the GPU that will run it.

SOURCE is a bundle (manifest.json + ranker.onnx) or a published version directory (model.onnx +
bundle/manifest.json). The plan goes next to the ONNX file unless --out says otherwise, so for a
version it lands where the gpu target's config expects it. INT8 calibrates on the bundle's samples.npz.
Builds with the TensorRT Python API, or with trtexec when --trtexec PATH is given."""
# recsvc.offline.models.tensorrt.PRECISIONS (a test keeps them equal). Every `recsvc` command builds the parser, so
# registering build-engine must not import torch (recsvc.offline.models) or tritonclient: those wait for the handler.
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True, kw_only=True)
class EngineSource:
    """Where the ONNX ranker, its manifest and its calibration samples are, and where the plan goes."""

    onnx: Path
    manifest: Manifest
    samples: Path | None
    plan: Path


def resolve_source(path: Path) -> EngineSource:
    """Read a bundle or a published version directory; ConfigError when it is neither."""
    from recsvc.bundle import MANIFEST, read_manifest  # numpy: not for registering the command

    if (path / MANIFEST).is_file():                          # a bundle
        onnx, bundle = path / "ranker.onnx", path
    elif (path / "bundle" / MANIFEST).is_file():             # a version directory
        onnx, bundle = path / "model.onnx", path / "bundle"
    else:
        raise ConfigError(f"{path} is neither a bundle (no {MANIFEST}) nor a published version (no bundle/{MANIFEST})")
    if not onnx.is_file():
        raise ConfigError(f"{path}: no {onnx.name} to build an engine from")
    samples = bundle / "samples.npz"
    return EngineSource(onnx=onnx, manifest=read_manifest(bundle), samples=samples if samples.is_file() else None,
                        plan=onnx.with_name(PLAN))  # fmt: skip


def build_engine_for(
    source: EngineSource,
    spec: EngineSpec,
    *,
    plan: Path | None = None,
    trtexec: Path | None = None,
    calibration_cache: Path | None = None,
    calibration_batch: int = 16,
    max_calibration_batches: int | None = None,
) -> tuple[Path, EngineInfo]:
    """Build the engine of ``source`` with the Python API, or with ``trtexec`` when given; return (plan, info)."""
    from recsvc.offline.models.tensorrt import (
        CalibrationBatches,
        build_engine,
        build_engine_with_trtexec,
        calibration_cache_path,
    )

    plan = plan if plan is not None else source.plan
    if trtexec is not None:
        cache = calibration_cache
        if cache is None and spec.precision == "int8" and calibration_cache_path(plan).is_file():
            cache = calibration_cache_path(plan)      # written by an earlier Python-API INT8 build
        return plan, build_engine_with_trtexec(trtexec, source.onnx, plan, spec, calibration_cache=cache)
    batches = None
    if spec.precision == "int8":
        if source.samples is None:
            raise ConfigError(
                f"an INT8 engine is calibrated on the bundle's samples.npz, and {source.onnx.parent} has none; "
                "retrain with a recsvc that writes it, or build fp16"
            )
        batches = CalibrationBatches.from_npz(
            source.samples, history_len=spec.history_len, num_candidates=spec.num_candidates,
            batch_size=calibration_batch, max_batches=max_calibration_batches,
        )  # fmt: skip
    return plan, build_engine(source.onnx, plan, spec, calibration=batches)


# ---------------------------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    """Add the ``build-engine`` command to ``recsvc``'s subparsers."""
    p = subparsers.add_parser(
        "build-engine", help="build the TensorRT engine (model.plan) of a bundle or published version, on this GPU",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("source", type=Path, help="a bundle directory or a published version (model_repository/ranker/N)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="engine precision (default fp16; int8 calibrates on the bundle's samples.npz)")
    p.add_argument("--out", type=Path, help="plan path (default: model.plan next to the ONNX file)")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch the engine accepts (default 1)")
    p.add_argument("--opt-batch", type=int, default=16, help="batch the kernels are tuned for (default 16)")
    p.add_argument("--max-batch", type=int, default=64, help="must equal max_batch_size of ranker_gpu.pbtxt (64)")
    p.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT workspace limit in MiB")
    p.add_argument("--calibration-batch", type=int, default=16, help="INT8: samples.npz rows per calibration batch")
    p.add_argument("--calibration-batches", type=int, help="INT8: calibrate on at most this many batches")
    p.add_argument("--trtexec", type=Path, help="build with this trtexec binary instead of the TensorRT Python API")
    p.add_argument("--calibration-cache", type=Path,
                   help="trtexec INT8: calibration cache to read (default: model.plan.calibration when present)")
    p.set_defaults(func=run_build_engine)


def run_build_engine(args: argparse.Namespace) -> int:
    """The ``build-engine`` handler: build, print what was built; the exit code."""
    from recsvc.offline.models.tensorrt import EngineSpec

    source = resolve_source(args.source)
    spec = EngineSpec(
        history_len=source.manifest.history_len, num_candidates=source.manifest.num_candidates,
        precision=args.precision, min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
        workspace_mib=args.workspace_mib,
    )  # fmt: skip
    plan, info = build_engine_for(
        source, spec, plan=args.out, trtexec=args.trtexec, calibration_cache=args.calibration_cache,
        calibration_batch=args.calibration_batch, max_calibration_batches=args.calibration_batches,
    )  # fmt: skip
    calibrated = f", calibrated on {info.calibration_rows} sample rows" if info.calibration_rows else ""
    sys.stdout.write(f"{plan}: {info.precision} engine for {info.gpu} (TensorRT {info.tensorrt_version}, "
                     f"{info.builder}), batch {info.batch[0]}..{info.batch[2]} (opt {info.batch[1]}), "
                     f"L={info.history_len}, C={info.num_candidates}{calibrated}, "
                     f"built in {info.build_seconds:.1f} s\n")  # fmt: skip
    return 0
