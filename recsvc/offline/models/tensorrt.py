"""TensorRT engines (model.plan) of the ranker, for Triton's ``tensorrt_plan`` platform.

A serialized engine runs only on the GPU model and the TensorRT version that built it, so it is built on
the serving host, from the ONNX file every version already carries, and a small JSON next to it
(``model.plan.json``) records what it was built with and for::

    {"tensorrt_version": "10.5.0", "gpu": "NVIDIA H100 80GB HBM3", "precision": "int8", "build_seconds": 41.2,
     "builder": "tensorrt-python", "history_len": 50, "num_candidates": 100, "batch": [1, 16, 64], ...}

Two builders: the TensorRT Python API (``build_engine``) and NVIDIA's ``trtexec`` binary (``trtexec_command``
builds its command line; ``build_engine_with_trtexec`` runs it), which the chart's build-engines.sh uses
in the TensorRT image. Both use explicit batch and one optimisation profile: the batch ranges over
1..64 (kernels tuned for 16, ranker_gpu.pbtxt's first preferred batch), L and C are fixed to the bundle's
history_len and num_candidates, which the service always pads to.

Precisions: ``fp16``; ``int8`` (FP16 kept for layers without INT8 kernels), calibrated with
``IInt8EntropyCalibrator2`` on the bundle's samples.npz, real users' histories and retrieval candidates,
so the activation ranges are those the served ranker sees; ``fp32`` for comparisons. trtexec cannot
calibrate from samples.npz, so an INT8 trtexec build reads the calibration cache a Python-API build wrote
(``model.plan.calibration``).

``tensorrt`` is imported inside the functions that need it: recsvc installs and runs without it, and
without it (or without a visible GPU) ``build_engine`` raises a ConfigError that says so.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from recsvc.bundle import sha256_file
from recsvc.errors import ConfigError

__all__ = [
    "INPUTS",
    "PRECISIONS",
    "CalibrationBatches",
    "EngineInfo",
    "EngineSpec",
    "build_engine",
    "build_engine_with_trtexec",
    "calibration_cache_path",
    "info_path",
    "parse_trtexec_output",
    "read_engine_info",
    "trtexec_command",
]

INPUTS = ("HISTORY", "CANDIDATES")
PRECISIONS = ("fp32", "fp16", "int8")
PYTHON_BUILDER = "tensorrt-python"

_Ints = npt.NDArray[np.int64]


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """What to build: the bundle's L and C, the batch profile, the precision and the workspace."""

    history_len: int
    num_candidates: int
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64          # must equal max_batch_size in ranker_gpu.pbtxt
    workspace_mib: int = 1024

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/"
                f"{self.max_batch}"
            )
        if self.history_len < 1 or self.num_candidates < 1 or self.workspace_mib < 1:
            raise ConfigError(
                f"history_len, num_candidates and workspace_mib must be positive, got {self.history_len}, "
                f"{self.num_candidates}, {self.workspace_mib}"
            )

    def shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """(min, opt, max) shape of every input: the batch varies, the columns are the bundle's."""
        columns = {"HISTORY": self.history_len, "CANDIDATES": self.num_candidates}
        return {
            name: ((self.min_batch, cols), (self.opt_batch, cols), (self.max_batch, cols))
            for name, cols in columns.items()
        }


@dataclass(frozen=True, kw_only=True)
class EngineInfo:
    """The JSON next to a plan: what built it, for which GPU, and from which ONNX file."""

    tensorrt_version: str
    gpu: str
    precision: str
    build_seconds: float
    builder: str
    history_len: int
    num_candidates: int
    batch: list[int]                 # [min, opt, max]
    onnx_sha256: str
    created_at: str
    calibration_rows: int = 0        # INT8: rows of samples.npz the calibrator fed (0 from a cache)
    extra: dict[str, Any] = field(default_factory=dict)


def info_path(plan: Path) -> Path:
    """Where the JSON of ``plan`` lives (``model.plan`` -> ``model.plan.json``)."""
    return plan.with_name(plan.name + ".json")


def calibration_cache_path(plan: Path) -> Path:
    """Where an INT8 build writes (and a trtexec INT8 build reads) the calibration cache."""
    return plan.with_name(plan.name + ".calibration")


def read_engine_info(plan: Path) -> EngineInfo | None:
    """The recorded build of ``plan``, or None when it has no readable JSON."""
    try:
        return EngineInfo(**orjson.loads(info_path(plan).read_bytes()))
    except (OSError, orjson.JSONDecodeError, TypeError):
        return None


# ----------------------------------------------------------------------------------- calibration
class CalibrationBatches:
    """Rows of samples.npz as fixed-size int64 batches, in file order, for INT8 calibration.

    TensorRT calibrates at one shape (the calibration profile), so every batch has exactly
    ``batch_size`` rows: a last, partial batch is left out rather than padded with made-up rows.
    Each batch is a fresh C-contiguous array per input, ready to be copied to the GPU as is.
    """

    def __init__(
        self, history: _Ints, candidates: _Ints, *, batch_size: int, max_batches: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"calibration batch size must be positive, got {batch_size}")
        history, candidates = np.asarray(history), np.asarray(candidates)
        for name, array in (("HISTORY", history), ("CANDIDATES", candidates)):
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise ConfigError(f"calibration {name} must be a 2-D integer array, got {array.dtype} {array.shape}")
        if len(history) != len(candidates):
            raise ConfigError(f"calibration HISTORY has {len(history)} rows but CANDIDATES has {len(candidates)}")
        count = len(history) // batch_size
        if max_batches is not None:
            count = min(count, max_batches)
        if count < 1:
            raise ConfigError(
                f"{len(history)} calibration rows are fewer than one batch of {batch_size}; "
                "use a smaller --calibration-batch or a bundle with more samples"
            )
        self.batch_size = batch_size
        self.num_batches = count
        self._history = history
        self._candidates = candidates

    @classmethod
    def from_npz(
        cls,
        path: Path,
        *,
        history_len: int,
        num_candidates: int,
        batch_size: int,
        max_batches: int | None = None,
    ) -> CalibrationBatches:
        """Read a bundle's samples.npz and check it against the engine's L and C."""
        try:
            with np.load(path) as samples:
                arrays = {name: np.asarray(samples[name]) for name in INPUTS if name in samples}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read calibration samples {path}: {exc}") from exc
        missing = [name for name in INPUTS if name not in arrays]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}; it must hold HISTORY [N, L] and CANDIDATES [N, C]")
        for name, cols in (("HISTORY", history_len), ("CANDIDATES", num_candidates)):
            if arrays[name].ndim != 2 or arrays[name].shape[1] != cols:
                raise ConfigError(f"{path}: {name} has shape {arrays[name].shape}; the engine needs [N, {cols}]")
        return cls(arrays["HISTORY"], arrays["CANDIDATES"], batch_size=batch_size, max_batches=max_batches)

    @property
    def rows(self) -> int:
        """Rows the calibrator will see."""
        return self.num_batches * self.batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, _Ints]]:
        for i in range(self.num_batches):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield {
                "HISTORY": np.ascontiguousarray(self._history[rows], dtype=np.int64),
                "CANDIDATES": np.ascontiguousarray(self._candidates[rows], dtype=np.int64),
            }


# ------------------------------------------------------------------------------ Python API builder
def _import_tensorrt() -> Any:
    try:
        # importlib: no stubs exist, and Any is what the rest of this module expects from it.
        tensorrt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ConfigError(
            "cannot build a TensorRT engine: the tensorrt Python package is not installed here "
            f"({exc}); install the TensorRT release that the serving Triton uses, or pass --trtexec PATH"
        ) from exc
    return tensorrt


def _gpu_name() -> str:
    """Name of the CUDA device the build runs on; ConfigError when none is visible."""
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ConfigError(
            f"cannot build a TensorRT engine: no CUDA GPU is visible to this process{hint}. An engine runs "
            "only on the GPU model that built it: build it on the serving GPU host"
        )
    return str(torch.cuda.get_device_name(torch.cuda.current_device()))


def _network_flags(trt: Any) -> int:
    # Explicit batch is the only mode from TensorRT 10 on (the flag is deprecated there); 8.x needs it set.
    if int(str(trt.__version__).split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _calibrator(trt: Any, batches: CalibrationBatches, cache: Path) -> Any:
    """An IInt8EntropyCalibrator2 that feeds ``batches`` from GPU buffers and writes its cache to ``cache``."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]  # tensorrt has no stubs
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            # TensorRT reads the device memory after get_batch returns: keep the current batch alive.
            self._on_device: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None                      # no more data: calibration ends
            unknown = [n for n in names if n not in batch]
            if unknown:
                raise ConfigError(f"the network asks for calibration inputs {unknown}; samples have {sorted(batch)}")
            self._on_device = {n: torch.from_numpy(batch[n]).cuda() for n in names}
            torch.cuda.synchronize()
            return [int(self._on_device[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            # Always calibrate from this bundle's samples: a cache from another model would be silently wrong.
            return None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(
    onnx_path: Path, plan_path: Path, spec: EngineSpec, *, calibration: CalibrationBatches | None = None
) -> EngineInfo:
    """Build ``plan_path`` from ``onnx_path`` with the TensorRT Python API; write its JSON; return it.

    Raises ConfigError when tensorrt is not installed, no GPU is visible, INT8 has no calibration data,
    the ONNX file does not parse, or the build fails. The plan appears atomically (written, then renamed).
    """
    trt = _import_tensorrt()
    gpu = _gpu_name()
    if spec.precision == "int8" and calibration is None:
        raise ConfigError("an INT8 engine needs calibration data: the bundle's samples.npz (real ranker inputs)")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {onnx_path}: {errors}")
    _check_inputs(trt, network, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in spec.shapes().items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if spec.precision in ("fp16", "int8"):
        # INT8 builds keep FP16 for the layers that have no INT8 kernel, instead of falling back to FP32.
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8":
        assert calibration is not None
        config.set_flag(trt.BuilderFlag.INT8)
        # Calibration runs at one shape: the calibration batch size with the bundle's L and C.
        calib_profile = builder.create_optimization_profile()
        for name, (low, _, _) in spec.shapes().items():
            shape = (calibration.batch_size, low[1])
            calib_profile.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _calibrator(trt, calibration, calibration_cache_path(plan_path))

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise ConfigError(f"TensorRT could not build an engine from {onnx_path} ({spec.precision}); see its log above")
    _write_atomically(plan_path, bytes(serialized))
    rows = calibration.rows if spec.precision == "int8" and calibration is not None else 0
    info = _info(spec, onnx_path, tensorrt_version=str(trt.__version__), gpu=gpu, builder=PYTHON_BUILDER,
                 seconds=seconds, calibration_rows=rows)  # fmt: skip
    _write_atomically(info_path(plan_path), orjson.dumps(asdict(info), option=orjson.OPT_INDENT_2))
    return info


def _check_inputs(trt: Any, network: Any, onnx_path: Path) -> None:
    """The engine must take exactly what ranker_gpu.pbtxt declares: INT64 HISTORY and CANDIDATES."""
    inputs = {network.get_input(i).name: network.get_input(i).dtype for i in range(network.num_inputs)}
    if sorted(inputs) != sorted(INPUTS):
        raise ConfigError(f"{onnx_path}: ranker inputs must be {list(INPUTS)}, TensorRT sees {sorted(inputs)}")
    int64 = getattr(trt, "int64", None)
    wrong = {name: str(dtype) for name, dtype in inputs.items() if dtype != int64}
    if wrong:
        # TensorRT 8.x casts INT64 inputs down to INT32; Triton would then refuse the TYPE_INT64 config.
        raise ConfigError(
            f"TensorRT {trt.__version__} parses {wrong} from {onnx_path}, but ranker_gpu.pbtxt declares "
            "TYPE_INT64: build with TensorRT 10 or later, which keeps INT64 inputs"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _info(
    spec: EngineSpec, onnx_path: Path, *, tensorrt_version: str, gpu: str, builder: str, seconds: float,
    calibration_rows: int = 0, extra: dict[str, Any] | None = None,
) -> EngineInfo:  # fmt: skip
    return EngineInfo(
        tensorrt_version=tensorrt_version,
        gpu=gpu,
        precision=spec.precision,
        build_seconds=round(seconds, 2),
        builder=builder,
        history_len=spec.history_len,
        num_candidates=spec.num_candidates,
        batch=[spec.min_batch, spec.opt_batch, spec.max_batch],
        onnx_sha256=sha256_file(onnx_path),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        calibration_rows=calibration_rows,
        extra=extra or {},
    )


# ------------------------------------------------------------------------------------- trtexec
def trtexec_command(
    trtexec: Path, onnx_path: Path, plan_path: Path, spec: EngineSpec, *, calibration_cache: Path | None = None
) -> list[str]:
    """The trtexec argv that builds ``plan_path`` as ``spec`` says (no inference run after the build).

    INT8 needs ``calibration_cache``: trtexec has no way to read samples.npz, and without a cache it
    calibrates on random data, which gives ranges unrelated to real ranker inputs.
    """
    def shapes(which: int) -> str:
        return ",".join(f"{name}:{dims[which][0]}x{dims[which][1]}" for name, dims in spec.shapes().items())

    command = [
        str(trtexec),
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={shapes(0)}",
        f"--optShapes={shapes(1)}",
        f"--maxShapes={shapes(2)}",
        f"--memPoolSize=workspace:{spec.workspace_mib}",      # MiB
        "--skipInference",
    ]
    if spec.precision in ("fp16", "int8"):
        command.append("--fp16")
    if spec.precision == "int8":
        if calibration_cache is None:
            raise ConfigError(
                "trtexec cannot calibrate INT8 on samples.npz: build the INT8 engine once with the TensorRT Python "
                "API (it writes model.plan.calibration) and pass that file as the calibration cache"
            )
        command += ["--int8", f"--calib={calibration_cache}"]
    return command


_TRT_BANNER = re.compile(r"\[TensorRT v([0-9][0-9.]*)\]")
_DEVICE = re.compile(r"Selected Device: (.+?)\s*$", re.M)


def parse_trtexec_output(output: str) -> tuple[str, str]:
    """(TensorRT version, GPU name) from trtexec's log; "unknown" for what it does not say.

    The banner encodes the version as an integer: v8601 is 8.6.1 (TensorRT 8), v100500 is 10.5.0
    (TensorRT 10 and later); newer builds may print it dotted.
    """
    version = "unknown"
    banner = _TRT_BANNER.search(output)
    if banner:
        raw = banner.group(1)
        if "." in raw:
            version = raw
        elif len(raw) >= 6:
            number = int(raw)
            version = f"{number // 10000}.{number // 100 % 100}.{number % 100}"
        else:
            number = int(raw)
            version = f"{number // 1000}.{number // 100 % 10}.{number % 100}"
    device = _DEVICE.search(output)
    return version, device.group(1) if device else "unknown"


def build_engine_with_trtexec(
    trtexec: Path,
    onnx_path: Path,
    plan_path: Path,
    spec: EngineSpec,
    *,
    calibration_cache: Path | None = None,
    timeout_s: float = 3600.0,
) -> EngineInfo:
    """Build ``plan_path`` by running trtexec; write its JSON; return it. ConfigError when trtexec fails."""
    tmp = plan_path.with_name(f".{plan_path.name}.{os.getpid()}.tmp")
    command = trtexec_command(trtexec, onnx_path, tmp, spec, calibration_cache=calibration_cache)
    started = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot run {trtexec}: {exc}") from exc
    seconds = time.perf_counter() - started
    output = run.stdout + run.stderr
    if run.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise ConfigError(f"{trtexec} failed with status {run.returncode} building {plan_path}:\n{tail}")
    tmp.replace(plan_path)
    version, gpu = parse_trtexec_output(output)
    info = _info(spec, onnx_path, tensorrt_version=version, gpu=gpu, builder=f"trtexec {trtexec}", seconds=seconds,
                 extra={"command": command[1:]})  # fmt: skip
    _write_atomically(info_path(plan_path), orjson.dumps(asdict(info), option=orjson.OPT_INDENT_2))
    return info
