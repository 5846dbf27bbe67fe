#!/bin/bash
# GPU machine: run tests/tensorrt (and, with `bench ...`, bench/bench_tensorrt.py) against the real
# TensorRT 8.5.3 unpacked in /tmp/trt. Run from the checkout root after the payload commands
# (docs/tensorrt.md). Each call installs whatever of these it was sent (the 64 MiB limit per command
# splits them), then:
#   .trt/s2/whl              cuda-bindings, cuda-pathfinder, pytest, pluggy, iniconfig wheels (cp312)
#   .trt/s2/views32_u8.npy   the 32 photo views (tools/trt85/make_views.py)
#   .trt/whl2                the pyarrow wheel, where the GPU machine has none
#   `run`                    pytest -m "tensorrt or gpu" tests/tensorrt (PYTEST_K selects tests)
#   `bench ARGS...`          python bench/bench_tensorrt.py ARGS...
# /tmp/trt/effnet.onnx comes from a payload command.
set -u
. /tmp/trt/env.sh || exit 1
SITE=/tmp/site
mkdir -p $SITE
for d in .trt/s2/whl .trt/whl2; do
  [ -d $d ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $d/*.whl
done
[ -f .trt/s2/views32_u8.npy ] && cp .trt/s2/views32_u8.npy /tmp/trt/
export PYTHONPATH=$SITE:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
export TRTCAL_TEST_MODEL=/tmp/trt/effnet.onnx TRTCAL_TEST_PHOTOS=/tmp/trt/views32_u8.npy
# The GPU machine has no cuBLAS/cuDNN, which TensorRT 8.5 enables by default.
export TRTCAL_TRT_TACTIC_SOURCES=EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS
python3 -c 'import tensorrt, pyarrow, onnx, cuda.bindings; print("tensorrt", tensorrt.__version__, "pyarrow", pyarrow.__version__, "onnx", onnx.__version__)'
case "${1:-}" in
  run) python3 -m pytest -p no:cacheprovider -m "tensorrt or gpu" ${PYTEST_K:+-k "$PYTEST_K"} tests/tensorrt -v -s -rs 2>&1 | tee ${OUT:-/tmp}/tests.log ;;
  bench) shift; python3 bench/bench_tensorrt.py "$@" 2>&1 | tee -a ${OUT:-/tmp}/bench.log ;;
  *) echo "installed; run with: bash $0 run | bench ARGS" ;;
esac
