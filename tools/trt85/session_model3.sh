#!/bin/bash
# GPU machine, after the payload commands (TensorRT unpacked in /tmp/trt, docs/tensorrt.md): TensorRT
# 8.5's EntropyCalibration2 and MinMax caches for the third parity model(s) of
# tools/trt85/make_views3.py. Carry .trt/data3 and .trt/tk. MODELS="cls det" (default) or one of
# them; DUMP=1 also writes TensorRT's FP32 activations (probe_trt.py dump) for parity.py --dump.
# Afterwards, here: tools/trt85/parity.py $OUT/cls_e2.cache --minmax $OUT/cls_mm.cache \
#   --onnx .trt/data3/cls.onnx --views .trt/data3/cls_views32_u8.npy --offset 127.5 --scale 0.00784313725490196
set -u
[ -f /tmp/trt/env.sh ] || { echo "!! no /tmp/trt/env.sh: run the payload commands first (docs/tensorrt.md)"; exit 2; }
. /tmp/trt/env.sh
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}; D=.trt/data3; OUT=${OUT:-/tmp/out3}; mkdir -p "$OUT"
IMG="--offset 127.5 --scale 0.00784313725490196"  # PaddleOCR's (x / 255 - 0.5) / 0.5, make_views3.py
run() { echo "== $(date +%T) $*"; timeout "${TMO:-240}" "$@" || echo "!! rc=$? $*"; }
for m in ${MODELS:-cls det}; do
  run $PY .trt/tk/trt_calibrate.py calib $D/$m.onnx $D/${m}_views32_u8.npy $OUT/${m}_e2.cache --n 32 --batch 32 --algo entropy2 $IMG
  run $PY .trt/tk/trt_calibrate.py calib $D/$m.onnx $D/${m}_views32_u8.npy $OUT/${m}_mm.cache --n 32 --batch 32 --algo minmax $IMG
  if [ -n "${DUMP:-}" ]; then
    run $PY tools/trt85/probe_trt.py dump $D/$m.onnx $D/${m}_views32_u8.npy $OUT/${m}_dump.npz --n 32 --no-tf32 $IMG
  fi
done
ls -la "$OUT"
