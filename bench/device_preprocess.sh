#!/usr/bin/env bash
# The 16-core measurement of issue 4 (Ray pipeline vs single-process Pillow loop, 16 workers) on a
# device machine, which has no Ray and no package index. Ray travels as a slimmed cp312 wheel.
#
# Phase 1, here (needs pip access to PyPI), from the repo root:
#     bench/device_preprocess.sh prepare
#   fills .whl/ (git-excluded) with cp312 manylinux wheels: Ray 2.60.0 without its Java jars and
#   the libraries trtcal does not use (rllib, serve, tune, train, llm, data), Ray's small
#   dependencies, and fsspec; pyarrow (~40 MB) goes to .whl-arrow/ because both together exceed
#   the device tool's 64 MiB per call. It prints the sizes.
#
# Phase 2, through the device tool (the lead decides; nothing here runs it):
#   a) if pyarrow is missing there (`python3 -c "import pyarrow"`), one call that carries it and
#      installs it into .device-site/ (an ignored folder that stays while the machine is warm):
#         run(command="bash bench/device_preprocess.sh device-install .whl-arrow", carry=[".whl-arrow"])
#   b) then, on the same warm machine (or alone if pyarrow is there):
#         run(command="bash bench/device_preprocess.sh device-run", carry=[".whl"], timeout_s=600)
#      It installs .whl/ into .device-site/, generates 10,000 synthetic JPEGs under /tmp and runs
#      bench/bench_preprocess.py --workers 16, writing $OUT/preprocess-16.json and $OUT/log.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY_VERSION=2.60.0
PYARROW_VERSION=26.0.1
FSSPEC_VERSION=2026.9.0
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Ray's required dependencies (Requires-Dist without extras); the device image may lack some.
RAY_DEPS=(click filelock jsonschema jsonschema-specifications referencing rpds-py attrs "msgpack<2" "packaging>=24.2"
          protobuf pyyaml requests idna charset-normalizer urllib3 certifi aiohappyeyeballs aiosignal frozenlist
          multidict propcache yarl typing_extensions)
PY=${PYTHON:-python3}

download() {  # download DIR SPEC...
  local dir=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" "$@"
}

slim_ray() {  # rewrite the Ray wheel without the parts trtcal never loads (RECORD rewritten to match)
  "$PY" - "$1" <<'EOF'
import base64, csv, hashlib, io, os, sys, zipfile
path = sys.argv[1]
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/tune/", "ray/train/", "ray/llm/", "ray/data/",
        "ray/dashboard/client/build/")
src = zipfile.ZipFile(path)
out_path = path + ".slim"
record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
rows = []
with zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    for info in src.infolist():
        if info.filename.startswith(drop) or info.filename == record_name:
            continue
        data = src.read(info)
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append((info.filename, f"sha256={digest}", str(len(data))))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows + [(record_name, "", "")])
    out.writestr(record_name, buf.getvalue())
os.replace(out_path, path)
print(f"slimmed {os.path.basename(path)}: {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
}

case "${1:-}" in
  prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.whl-arrow/' .git/info/exclude 2>/dev/null || echo '/.whl-arrow/' >> .git/info/exclude
    grep -qx '/.device-site/' .git/info/exclude 2>/dev/null || echo '/.device-site/' >> .git/info/exclude
    rm -rf .whl .whl-arrow && mkdir -p .whl .whl-arrow
    download .whl "ray==${RAY_VERSION}"
    slim_ray .whl/ray-${RAY_VERSION}-*.whl
    download .whl "${RAY_DEPS[@]}" "fsspec==${FSSPEC_VERSION}"
    download .whl-arrow "pyarrow==${PYARROW_VERSION}"
    du -sh .whl .whl-arrow
    ls -la .whl .whl-arrow
    ;;
  device-install)
    dir=${2:?which wheel folder}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .device-site "$dir"/*.whl
    PYTHONPATH=.device-site python3 -c "import pyarrow; print('pyarrow', pyarrow.__version__)"
    ;;
  device-run)
    mkdir -p .device-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .device-site .whl/*.whl
    export PYTHONPATH="$PWD/.device-site:$PWD" PYTHONUNBUFFERED=1
    python3 -c "import ray, pyarrow, fsspec, PIL, numpy; print('ray', ray.__version__, 'pyarrow', pyarrow.__version__, 'pillow', PIL.__version__, 'numpy', numpy.__version__)"
    nproc; free -g; df -h /tmp
    out=${OUT:-/tmp/out}; mkdir -p "$out"
    python3 bench/bench_preprocess.py --num-images 10000 --workers 16 --data-dir /tmp/trtcal-bench \
      --json "$out/preprocess-16.json" 2>&1 | tee "$out/log.txt"
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
