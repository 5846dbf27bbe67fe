"""A tiny image CNN built with onnx.helper, for fault and stress runs that need a real model fast.

input [N,3,32,32] -> Conv 3x3 (8) -> Relu -> Conv 3x3 stride 2 (8) -> Relu -> GlobalAveragePool
-> Flatten -> Gemm (10) -> logits. Weights come from a seeded generator: same seed, same bytes.
Importable by bench/stress.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "input"
SIDE = 32


def tiny_cnn(seed: int = 0, *, names: dict[str, str] | None = None, side: int = SIDE) -> onnx.ModelProto:
    """The model; `names` renames activations (e.g. {"r1": "hostile\\nname"}); `side` 224 takes ImageNet-preprocessed images."""
    rename = names or {}

    def n(name: str) -> str:
        return rename.get(name, name)

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    b2 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w3 = (rng.standard_normal((10, 8)) * 0.5).astype(np.float32)
    b3 = (rng.standard_normal(10) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [INPUT, "w1", "b1"], [n("c1")], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", [n("c1")], [n("r1")], name="relu1"),
        helper.make_node("Conv", [n("r1"), "w2", "b2"], [n("c2")], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", [n("c2")], [n("r2")], name="relu2"),
        helper.make_node("GlobalAveragePool", [n("r2")], [n("pool")], name="pool"),
        helper.make_node("Flatten", [n("pool")], [n("flat")], name="flatten"),
        helper.make_node("Gemm", [n("flat"), "w3", "b3"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(a, k) for k, a in
                     (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_cnn(path: Path, seed: int = 0, **kwargs: object) -> Path:
    path.write_bytes(tiny_cnn(seed, **kwargs).SerializeToString(deterministic=True))  # type: ignore[arg-type]
    return path


def tiny_batch(n: int = 8, seed: int = 0) -> np.ndarray:
    """[n,3,32,32] float32 inputs, roughly what a normalised image would give."""
    return np.random.default_rng(seed).standard_normal((n, 3, SIDE, SIDE)).astype(np.float32)
