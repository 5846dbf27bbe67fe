#!/usr/bin/env bash
# ONNX Runtime's CUDA provider on a device machine: the GPU tests that need it, and issue 3's
# benchmark with device="cuda". The device has no package index and onnxruntime-gpu's wheel
# (244 MiB) is larger than one device call may carry (64 MiB), so it travels in parts, one call
# each, onto the same warm machine; this script (the last call) joins and checks them.
#
# Here:   bench/device_calibrate.sh prepare      # .whl-cal/: onnx, pytest, photos, model
#         pip download onnxruntime-gpu==1.31.1 (cp312, manylinux_2_28) and split it into
#         .ortgpu/p1/part (20 MiB) .. .ortgpu/p5/part (56 MiB each); its sha256 in .whl-cal/ortgpu.sha256
# There:  run(carry=[".whl-cal", ".ortgpu/p1"], command="true"), then p2 .. p4 the same way, then
#         run(carry=[".ortgpu/p5"], command="bash bench/device_ortgpu.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}; mkdir -p "$out"
wheel=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat .ortgpu/p1/part .ortgpu/p2/part .ortgpu/p3/part .ortgpu/p4/part .ortgpu/p5/part > "$wheel"
echo "$(cat .whl-cal/ortgpu.sha256)  $wheel" | sha256sum -c -
mkdir -p .device-site/skimage
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .device-site "$wheel" .whl-cal/*.whl
: > .device-site/skimage/__init__.py
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
# onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* pip packages PyTorch brought.
cat > .device-site/sitecustomize.py <<'EOF'
try:
    import onnxruntime as _ort
    _ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
except Exception as _exc:  # reported by the provider check below
    print("preload_dlls:", _exc)
EOF
python3 -c "import onnxruntime as ort, torch; print('onnxruntime', ort.__version__, ort.get_available_providers(), 'torch', torch.__version__, torch.version.cuda)" 2>&1 | tee "$out/providers.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 | tail -25 | tee "$out/pytest-gpu.txt"
python3 bench/bench_calibrate.py --sizes 1000 --kinds plain-cuda trtcal-cuda --limit-gib 100 --work-dir /tmp/trtcal-cal \
  --results "$out/RESULTS-calibrate-cuda.md" 2>&1 | grep -v '^{' | tail -20
