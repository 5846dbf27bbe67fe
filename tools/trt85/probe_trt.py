#!/usr/bin/env python3
"""Black-box experiments on TensorRT 8.5's calibrators (GPU machine; source /tmp/trt/env.sh first).

  probes PROBES.npz OUT.json [--algos entropy2,entropy,minmax,legacy] [--group 48]
      One network per group of probes: each probe is a network input [1, n] followed by a ReLU
      whose output is a network output, so one build calibrates 2 x group tensors (the input's
      histogram as crafted, and its ReLU'd copy with a zero spike). Writes every cache line.
  dump MODEL DATA.npy OUT.npz [--n N] [--offset O --scale S] [--no-tf32]
      An FP32 engine with every float tensor marked as an output, run on the first N samples in
      one batch; saves each tensor's max |x| and its 2048-bin |x| histograms under three binning
      rules, so trtcal's search can be run on the activations TensorRT computes on the GPU.

Tactic sources are limited to EDGE_MASK_CONVOLUTIONS | JIT_CONVOLUTIONS (no cuBLAS/cuDNN there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

trt = None
LOG = None
CALIBRATORS = {
    "entropy2": "IInt8EntropyCalibrator2",
    "entropy": "IInt8EntropyCalibrator",
    "minmax": "IInt8MinMaxCalibrator",
    "legacy": "IInt8LegacyCalibrator",
}


def make_calibrator(algo, buffers, batch, quantile=0.9999, cutoff=1.0):
    """Feeds one batch: `buffers` maps input name -> torch CUDA tensor; returns the cache text."""
    base = getattr(trt, CALIBRATORS[algo])

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)
            self.done = False
            self.cache = b""

        def get_batch_size(self):
            return batch

        def get_batch(self, names, p_str=None):
            if self.done:
                return None
            self.done = True
            return [int(buffers[n].data_ptr()) for n in names]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            self.cache = bytes(cache)

        def get_quantile(self):
            return quantile

        def get_regression_cutoff(self):
            return cutoff

        def read_histogram_cache(self, length):
            return None

        def write_histogram_cache(self, ptr, length):
            return None

    return Calibrator()


def config(builder, int8=True, tf32=True, workspace_gib=2.0):
    cfg = builder.create_builder_config()
    if int8:
        cfg.set_flag(trt.BuilderFlag.INT8)
    if not tf32:
        cfg.clear_flag(trt.BuilderFlag.TF32)
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cfg.set_tactic_sources((1 << int(trt.TacticSource.EDGE_MASK_CONVOLUTIONS)) | (1 << int(trt.TacticSource.JIT_CONVOLUTIONS)))
    return cfg


def parse_cache(text: bytes) -> tuple[str, dict[str, str]]:
    lines = text.decode().splitlines()
    out = {}
    for line in lines[1:]:
        if line.strip():
            name, hexval = line.rsplit(":", 1)
            out[name] = hexval.strip()
    return (lines[0] if lines else ""), out


def cmd_probes(a):
    import torch

    z = np.load(a.probes)
    names = sorted(k[2:] for k in z.files if k.startswith("v:"))
    algos = a.algos.split(",")
    result = {"tensorrt": trt.__version__, "probes": {}, "caches": {al: {} for al in algos}, "headers": {}}
    for g0 in range(0, len(names), a.group):
        group = names[g0 : g0 + a.group]
        bufs = {}
        builder = trt.Builder(LOG)
        net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        inputs = []
        for j, name in enumerate(group):  # every input first: TensorRT's calibrator wants inputs bound first
            v, c = z[f"v:{name}"], z[f"c:{name}"]
            x = np.repeat(v, c).astype(np.float32)
            k = g0 + j
            inputs.append((j, name, x, k, net.add_input(f"p{k}", trt.float32, (1, x.size))))
        for _j, name, x, k, inp in inputs:
            relu = net.add_activation(inp, trt.ActivationType.RELU)
            relu.get_output(0).name = f"r{k}"
            net.mark_output(relu.get_output(0))
            bufs[f"p{k}"] = torch.from_numpy(x).reshape(1, -1).cuda()
            result["probes"][name] = {"input": f"p{k}", "relu": f"r{k}", "n": int(x.size)}
        for algo in algos:
            settings = [(0.9999, 1.0)] if algo != "legacy" else [(0.9999, 1.0), (0.99, 0.5)]
            for q, cut in settings:
                cal = make_calibrator(algo, bufs, 1, q, cut)
                cfg = config(builder)
                cfg.int8_calibrator = cal
                t0 = time.time()
                plan = builder.build_serialized_network(net, cfg)
                key = algo if (q, cut) == (0.9999, 1.0) else f"{algo}_q{q}_c{cut}"
                header, lines = parse_cache(cal.cache)
                result["caches"].setdefault(key, {}).update(lines)
                result["headers"][key] = header
                print(f"group {g0 // a.group}: {key} {len(lines)} lines, build {time.time() - t0:.1f} s, "
                      f"engine {'ok' if plan is not None else 'FAILED'}", flush=True)
        with open(a.out, "w") as f:  # after every group: a crash keeps what was measured
            json.dump(result, f)


def cmd_dump(a):
    import torch

    x = np.load(a.data)[: a.n]
    if x.dtype != np.float32:
        x = (x.astype(np.float32) - np.float32(a.offset)) * np.float32(a.scale)
    builder = trt.Builder(LOG)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(net, LOG)
    if not parser.parse_from_file(a.model):
        raise SystemExit("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    inp = net.get_input(0)
    shape = (x.shape[0],) + tuple(x.shape[1:])
    marked = []
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            if t.dtype == trt.float32 and not t.is_network_output:
                net.mark_output(t)
            if t.dtype == trt.float32:
                marked.append(t.name)
    cfg = config(builder, int8=False, tf32=not a.no_tf32)
    if any(d < 0 for d in inp.shape):
        prof = builder.create_optimization_profile()
        prof.set_shape(inp.name, shape, shape, shape)
        cfg.add_optimization_profile(prof)
    t0 = time.time()
    plan = builder.build_serialized_network(net, cfg)
    print(f"dump engine: {len(marked)} float tensors, build {time.time() - t0:.1f} s", flush=True)
    runtime = trt.Runtime(LOG)
    engine = runtime.deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    xi = torch.from_numpy(np.ascontiguousarray(x)).cuda()
    ctx.set_input_shape(inp.name, tuple(xi.shape))
    ctx.set_tensor_address(inp.name, xi.data_ptr())
    outs = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT:
            outs[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(n, outs[n].data_ptr())
    stream = torch.cuda.Stream()
    ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    outs[inp.name] = xi
    res = {}
    for n, t in outs.items():
        ab = t.abs().reshape(-1)
        amax = float(ab.max())
        res[f"amax:{n}"] = np.float32(amax)
        res[f"count:{n}"] = np.int64(ab.numel())
        if amax > 0:
            r32 = torch.tensor(amax, dtype=torch.float32, device="cuda")
            inv = torch.tensor(np.float32(2048) / np.float32(amax), device="cuda")
            w = torch.tensor(np.float32(amax) / np.float32(2048), device="cuda")
            variants = {
                "mul32": (ab * inv).floor(),
                "div32": (ab / w).floor(),
                "f64": (ab.double() * 2048.0 / float(r32)).floor(),
            }
            for key, idx in variants.items():
                idx = idx.clamp(max=2048).long()  # 2048 kept: it says where max |x| itself lands
                res[f"{key}:{n}"] = torch.bincount(idx, minlength=2049).cpu().numpy().astype(np.int64)
        res[f"zeros:{n}"] = np.int64(int((ab == 0).sum()))
    np.savez_compressed(a.out, **res)
    print(f"dumped {len(outs)} tensors to {a.out}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probes")
    p.add_argument("probes")
    p.add_argument("out")
    p.add_argument("--algos", default="entropy2,entropy,minmax,legacy")
    p.add_argument("--group", type=int, default=48)
    p.set_defaults(func=cmd_probes)
    p = sub.add_parser("dump")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--offset", type=float, default=127.0)
    p.add_argument("--scale", type=float, default=0.0078125)
    p.add_argument("--no-tf32", action="store_true")
    p.set_defaults(func=cmd_dump)
    a = ap.parse_args(argv)
    global trt, LOG
    import tensorrt as trt
    LOG = trt.Logger(trt.Logger.VERBOSE if a.verbose else trt.Logger.WARNING)
    a.func(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
