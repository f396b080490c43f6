#!/usr/bin/env bash
# The prepared GPU check, for any machine with an NVIDIA GPU, nvcc and ninja. From the repository root:
#
#   bash scripts/gpu_check.sh                 # results in out/gpu_check/ (or $OUT)
#
# A machine without nibabel can take it from wheels in .whl/ (scripts/fetch_device_wheels.sh downloads them
# on a machine with a package index). Steps (about 5 min on an H100/H200):
#
#   1. versions: nvidia-smi, python, torch/CUDA, nvcc, ninja;
#   2. installs the wheels in .whl/ (if any) into /tmp/site, nothing else;
#   3. builds the fused warp kernels (msode_sdk.warp._cuda; cache in build/msode_cache) and says whether they loaded;
#   4. `pytest -m gpu -q` (every GPU test: kernels == reference, graphed == eager loop, the bundled plan
#      captured whole with its multistart, end to end on the GPU == the CPU);
#   5. the benchmark of the bundled plan `python -m msode_sdk.bench --device cuda --backend torch`: model grid
#      eager and replayed as CUDA graphs, end to end from host arrays (a 1 mm pair from
#      scripts/make_latency_pairs.py when out/latency_pairs/pair0 exists, else the synthetic one) with the
#      load / stage / output split, throughput at batch 1 and 8, peak GPU memory, the warp kernel vs
#      affine_grid + grid_sample;
#   6. scripts/profile_registration.py (device time by kernel of one eager registration of the bundled plan);
#   7. the CPU tests of the warps (including the kernel math compiled for the host), if time is left.
#
# Logs go to $OUT or out/gpu_check/: env_build.txt, pytest_gpu.txt, bench.txt, bench.json, profile.txt,
# pytest_cpu.txt, summary.txt (+ build_error.log when the build failed).
# Exit status: 0 when the kernels loaded and the GPU tests passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-out/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
BUDGET=${GPU_CHECK_BUDGET_S:-330}  # stop starting optional steps after this many seconds

{
  echo "== gpu_check $(date -u +%FT%TZ) in $PWD"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" - <<'PYEOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
PYEOF
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"
  command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja not on PATH"
} 2>&1 | tee "$OUT_DIR/env_build.txt"

# Carried wheels (nibabel): install into /tmp/site, nothing heavy, no index.
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing carried wheels: $(ls .whl)" | tee -a "$OUT_DIR/env_build.txt"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$OUT_DIR/env_build.txt"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/sdk:$PWD/export:$PWD/training:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export MSODE_CACHE_DIR="${MSODE_CACHE_DIR:-$PWD/build/msode_cache}"
if ! "$PY" -c "import nibabel" 2>/dev/null; then
  echo "!! nibabel is missing: run scripts/fetch_device_wheels.sh on the dev machine and carry .whl" | tee -a "$OUT_DIR/env_build.txt"
fi

echo "== building the CUDA warp kernels ($(elapsed) s)" | tee -a "$OUT_DIR/env_build.txt"
timeout 240 "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT_DIR/env_build.txt"
import logging, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
t = time.time()
from msode_sdk.warp import _cuda
ok, why = _cuda.available()
print(f"kernels loaded: {ok} ({why}) in {time.time() - t:.1f} s; build dir {_cuda.build_directory()}")
raise SystemExit(0 if ok else 3)
PYEOF
BUILD_RC=${PIPESTATUS[0]}
find "$MSODE_CACHE_DIR" -name build_error.log -exec cp {} "$OUT_DIR/" \; 2>/dev/null

echo "== pytest -m gpu ($(elapsed) s)"
timeout 200 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$OUT_DIR/pytest_gpu.txt"
GPU_RC=${PIPESTATUS[0]}

BENCH_RC=skipped
if [ "$(elapsed)" -lt "$BUDGET" ]; then
  echo "== bench ($(elapsed) s)"
  PAIR_ARG=""
  [ -d out/latency_pairs/pair0 ] && PAIR_ARG="--pair out/latency_pairs/pair0"
  timeout $(( BUDGET + 20 - $(elapsed) )) "$PY" -m msode_sdk.bench --device cuda --backend torch --repeats 20 --warmup 3 \
    $PAIR_ARG --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.txt"
  BENCH_RC=${PIPESTATUS[0]}
fi

PROFILE_RC=skipped
if [ "$(elapsed)" -lt "$BUDGET" ]; then
  echo "== profile ($(elapsed) s)"
  timeout 90 "$PY" scripts/profile_registration.py --rows 25 > "$OUT_DIR/profile.txt" 2>&1
  PROFILE_RC=$?
fi

CPU_RC=skipped
if [ "$(elapsed)" -lt "$BUDGET" ]; then
  echo "== CPU tests of the warps ($(elapsed) s)"
  timeout $(( BUDGET + 20 - $(elapsed) )) "$PY" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" \
    tests/test_cuda_warp.py tests/test_transforms_warp.py 2>&1 | tee "$OUT_DIR/pytest_cpu.txt"
  CPU_RC=${PIPESTATUS[0]}
fi

{
  echo "kernels build rc=$BUILD_RC (0 = loaded)"
  echo "pytest -m gpu rc=$GPU_RC: $(tail -n 1 "$OUT_DIR/pytest_gpu.txt")"
  echo "bench rc=$BENCH_RC"
  echo "profile rc=$PROFILE_RC (profile.txt: device time by kernel, scripts/profile_registration.py)"
  [ -f "$OUT_DIR/bench.txt" ] && grep -E "^cuda |^warp |whole|throughput|peak GPU|not captured" "$OUT_DIR/bench.txt"
  echo "cpu tests rc=$CPU_RC${CPU_RC:+: $( [ -f "$OUT_DIR/pytest_cpu.txt" ] && tail -n 1 "$OUT_DIR/pytest_cpu.txt")}"
  echo "total $(elapsed) s"
} 2>&1 | tee "$OUT_DIR/summary.txt"
[ "$BUILD_RC" = 0 ] && [ "$GPU_RC" = 0 ] && exit 0
exit 1
