#!/usr/bin/env bash
# On a CUDA machine, in one command and without network: build the compiled kernels if
# a toolkit is there, run the CUDA tests and the GPU benchmarks, and leave every log
# and table in one folder (first argument, default gpu_check/).
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

echo "== CUDA tests"
python -m pytest -q -p no:cacheprovider -k "cuda" \
  tests/test_triton_backend.py tests/test_compiled_backend.py tests/test_backend_choice.py \
  > "$out/tests.log" 2>&1
status=$?
tail -n 3 "$out/tests.log"

echo "== GPU benchmarks"
python benchmarks/accumulate_sweep.py --device cuda --csv "$out/accumulate_sweep.csv" \
  > "$out/accumulate_sweep.log" 2>&1 || echo "accumulate sweep failed (see its log)"
tail -n 12 "$out/accumulate_sweep.log"
exit $status
