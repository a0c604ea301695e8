"""Bundles whose ranker passes every static check but is wrong when served (for refusal tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from recsvc.bundle import update_manifest


def wrong_shape_ranker(path: Path) -> None:
    """HISTORY [B, L], CANDIDATES [B, C] -> SCORES [B, C + 1]: right names and inputs, wrong output shape."""
    nodes = [
        helper.make_node("Cast", ["CANDIDATES"], ["c_float"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["CANDIDATES"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "one"], ["extra_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["extra_shape"], ["extra"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Concat", ["c_float", "extra"], ["SCORES"], axis=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "wrong_shape",
        [helper.make_tensor_value_info("HISTORY", TensorProto.INT64, ["B", "L"]),
         helper.make_tensor_value_info("CANDIDATES", TensorProto.INT64, ["B", "C"])],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["B", "C1"])],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def broken_bundle(source: Path, out: Path) -> Path:
    """A copy of ``source`` with the wrong-shape ranker, checksummed so publish accepts it."""
    shutil.copytree(source, out)
    wrong_shape_ranker(out / "ranker.onnx")
    update_manifest(out)
    return out


def damage_model(path: Path, how: str, *, seed: int = 0) -> None:
    """Damage an ONNX file in place so that it still loads: the ways a model file goes bad on disk.

    ``how``: "overwrite" (4 KiB of random bytes inside the largest weight), "replace" (that weight's
    values replaced by other finite ones) or "nan" (some of its values NaN). The graph, names and shapes
    stay valid, so ONNX Runtime and Triton load the file; only its bytes (and scores) differ.
    """
    import numpy as np
    import onnxruntime as ort

    data = bytearray(path.read_bytes())
    weight = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data))
    raw = weight.raw_data
    start = bytes(data).find(raw)
    assert start >= 0 and len(raw) >= 64, f"{path}: no raw weight to damage"
    rng = np.random.default_rng(seed)
    if how == "overwrite":
        n = min(4096, len(raw))
        offset = start + (len(raw) - n) // 2
        data[offset : offset + n] = rng.bytes(n)
    elif how == "replace":
        data[start : start + len(raw)] = rng.standard_normal(len(raw) // 4).astype(np.float32).tobytes()
    elif how == "nan":
        values = np.frombuffer(raw, dtype=np.float32).copy()
        values[::7] = np.nan
        data[start : start + len(raw)] = values.tobytes()
    else:
        raise ValueError(f"unknown damage {how!r}")
    path.write_bytes(bytes(data))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])     # still loads: that is the point


DAMAGES = ("overwrite", "replace", "nan")
