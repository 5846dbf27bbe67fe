"""A one-layer BERT-style encoder built with onnx.helper: token + position embeddings, one attention
block with an additive mask (HF's (1 - mask) * fill, or Where(mask, 0, -inf)), an output dense.

Dynamic axes "batch" and "sequence" as Hugging Face exports them. Hidden 24, 2 heads of 12: no
dimension coincides with the sequence lengths the tests pad to (16, 32)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, VOCAB, MAX_POS = 24, 2, 60, 64


def tiny_bert(fill: str = "-1e4") -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    head = HIDDEN // HEADS

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        weight("word_emb", VOCAB, HIDDEN, scale=1.0), weight("pos_emb", MAX_POS, HIDDEN, scale=0.5),
        weight("Wq", HIDDEN, HIDDEN), weight("Wk", HIDDEN, HIDDEN), weight("Wv", HIDDEN, HIDDEN), weight("Wo", HIDDEN, HIDDEN),
        numpy_helper.from_array(np.array([0, 0, HEADS, head], dtype=np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, HIDDEN], dtype=np.int64), "merge_shape"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(head), dtype=np.float32), "inv_sqrt"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(-1e4 if fill == "-1e4" else -np.inf, dtype=np.float32), "fill"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "i1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "dim1"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["word_emb", "input_ids"], ["tok"]),
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Gather", ["ids_shape", "dim1"], ["seq_len"]),
        n("Squeeze", ["seq_len"], ["seq_scalar"]),
        n("Range", ["i0", "seq_scalar", "i1"], ["positions"]),
        n("Gather", ["pos_emb", "positions"], ["pos"]),
        n("Add", ["tok", "pos"], ["emb"]),
        n("MatMul", ["emb", "Wq"], ["q"]), n("MatMul", ["emb", "Wk"], ["k"]), n("MatMul", ["emb", "Wv"], ["v"]),
        n("Reshape", ["q", "heads_shape"], ["q4"]), n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k", "heads_shape"], ["k4"]), n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        n("Reshape", ["v", "heads_shape"], ["v4"]), n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qh", "kt"], ["qk"]), n("Mul", ["qk", "inv_sqrt"], ["scores"]),
        n("Unsqueeze", ["attention_mask", "axes12"], ["mask4"]),
    ]
    if fill == "-1e4":
        nodes += [
            n("Cast", ["mask4"], ["mask_f"], to=TensorProto.FLOAT),
            n("Sub", ["one", "mask_f"], ["inv_mask"]),
            n("Mul", ["inv_mask", "fill"], ["ext_mask"]),
            n("Add", ["scores", "ext_mask"], ["masked_scores"]),
        ]
    else:
        nodes += [
            n("Cast", ["mask4"], ["mask_b"], to=TensorProto.BOOL),
            n("Where", ["mask_b", "zero", "fill"], ["ext_mask"]),
            n("Add", ["scores", "ext_mask"], ["masked_scores"]),
        ]
    nodes += [
        n("Softmax", ["masked_scores"], ["probs"], axis=-1),
        n("MatMul", ["probs", "vh"], ["ctx"]), n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"]),
        n("MatMul", ["ctx_m", "Wo"], ["attn_out"]), n("Add", ["attn_out", "emb"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def token_batch(length: int, num_rows: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """input_ids/attention_mask padded to `length`: the same real tokens whatever the length (<= 14 each)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 15, num_rows)
    ids = np.zeros((num_rows, length), dtype=np.int64)
    mask = np.zeros((num_rows, length), dtype=np.int64)
    for row, real in enumerate(lengths):
        ids[row, :real] = rng.integers(1, VOCAB, real)
        mask[row, :real] = 1
    return {"input_ids": ids, "attention_mask": mask}
