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
