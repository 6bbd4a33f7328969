#!/usr/bin/env bash
# On a CUDA machine, in one command and without network: build the compiled kernels if
# a toolkit is there, run the CUDA tests and the GPU benchmarks (kernel sweeps and
# whole windows, `python -m fused_accum bench`), and leave every log, CSV and PNG in
# one folder (first argument, default gpu_check/). About 5-10 minutes.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Uses the torch and triton already installed; installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - > "$out/environment.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as error:
    print("triton unavailable:", error)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY
cat "$out/environment.txt"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to check here" | tee -a "$out/environment.txt"
  exit 1
fi

echo "== building the compiled kernels (CUDA when a toolkit is found)"
if FUSED_ACCUM_CUDA=auto python setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  echo "built"
else
  echo "build failed (see build.log): the cpu/cuda backends are skipped, Triton still runs"
fi

echo "== tests (the whole suite; the CUDA ones run here)"
python -m pytest -q -p no:cacheprovider tests > "$out/tests.log" 2>&1
status=$?
tail -n 3 "$out/tests.log"

echo "== GPU benchmarks (CSV and PNG in $out/bench)"
python -m fused_accum bench --device cuda --out "$out/bench" --no-progress \
  > "$out/bench.log" 2>&1 || echo "benchmarks failed (see bench.log)"
tail -n 30 "$out/bench.log"
exit $status
