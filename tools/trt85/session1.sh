#!/bin/bash
# GPU machine, third command of a session (after the parts are in /tmp/trt): the black-box
# experiments of docs/algorithms.md. Run from the checkout root with .trt/ carried:
#   .trt/tk (the tensorrt85 toolkit), .trt/tools (this folder), .trt/data (probes, views, models).
set -u
T=.trt; TK=$T/tk; PY=${PYTHON:-python3}
bash $TK/gpu_unpack.sh /tmp/trt $T || exit $?
. /tmp/trt/env.sh
export PYTHONUNBUFFERED=1
cp $T/data/* /tmp/trt/ 2>/dev/null
D=/tmp/trt
run() { echo "== $(date +%T) $*"; timeout "${TMO:-240}" "$@" || echo "!! rc=$? $*"; }
IMG="--offset 127 --scale 0.0078125"
run $PY $T/tools/probe_trt.py probes $D/probes.npz $OUT/probes.json --group 48 --algos entropy2,minmax
mkdir -p $D/caches
for m in effnet ro; do
  [ -f $D/$m.onnx ] || { echo "!! no $D/$m.onnx"; continue; }
  run $PY $TK/trt_calibrate.py calib $D/$m.onnx $D/views32_u8.npy $D/caches/${m}_e2.cache --n 32 --batch 32 --algo entropy2 $IMG
  run $PY $T/tools/probe_trt.py dump $D/$m.onnx $D/views32_u8.npy $OUT/${m}_dump.npz --n 32 --no-tf32 $IMG
  run $PY $TK/trt_calibrate.py calib $D/$m.onnx $D/views32_u8.npy $D/caches/${m}_mm.cache --n 32 --batch 32 --algo minmax $IMG
  tar -C $D -cf $OUT/caches.tar caches
done
run $PY $T/tools/probe_trt.py probes $D/probes.npz $OUT/probes2.json --group 48 --algos entropy,legacy
tar -C $D -cf $OUT/caches.tar caches
ls -la $OUT
