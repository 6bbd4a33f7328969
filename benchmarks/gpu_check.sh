#!/usr/bin/env bash
# On a CUDA machine, in one command and without network: build the compiled kernels
# (the CUDA ones demanded), run the whole test suite with every GPU test expected to
# run, then the GPU benchmarks (kernel sweeps and whole windows, `python -m fused_accum
# bench`), and leave every log, CSV and PNG in one folder (first argument, default
# gpu_check/). About 5-10 minutes.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Uses the torch and triton already installed; installs nothing. Exits non-zero when
# the CUDA extension did not build, when a test failed, or when any test that needs
# CUDA was skipped; summary.txt (printed at the end) says which.
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

echo "== building the compiled kernels, CUDA included"
build="ok"
FUSED_ACCUM_CUDA=1 python setup.py build_ext --inplace > "$out/build.log" 2>&1 || build="FAILED"
python - >> "$out/build.log" 2>&1 <<'PY' || build="FAILED"
import torch
from fused_accum.backends import resolve_backend
resolve_backend("cuda", torch.device("cuda"), torch.float32)  # raises if the CUDA ops are missing
print("the CUDA backend resolves")
PY
echo "build: $build"

echo "== tests (the whole suite; every GPU test must run here)"
FUSED_ACCUM_EXPECT_COMPILED=1 python -m pytest -q -rs -p no:cacheprovider tests \
  > "$out/tests.log" 2>&1
tests_status=$?
tail -n 3 "$out/tests.log"
# -rs lists every skip with its reason; on a CUDA machine none may be for want of CUDA,
# of the CUDA kernels or of Triton (CPU-only cases, such as Triton's interpreter, may be)
gpu_path='needs CUDA|no CUDA kernels|compiled kernels are not built|triton cannot be imported'
cuda_skips=$(grep -E '^SKIPPED \[[0-9]+\]' "$out/tests.log" | grep -E "$gpu_path" \
  | sed -E 's/^SKIPPED \[([0-9]+)\].*/\1/' | awk '{total += $1} END {print total + 0}')

echo "== GPU benchmarks (CSV and PNG in $out/bench)"
bench="ok"
python -m fused_accum bench --device cuda --out "$out/bench" --no-progress \
  > "$out/bench.log" 2>&1 || bench="FAILED"
tail -n 30 "$out/bench.log"

echo "== backend order: fused_accum[cuda] against fused_accum[triton], case by case"
python benchmarks/backend_order.py "$out/bench" > "$out/backend_order.md" 2>&1
cat "$out/backend_order.md"
order=$(tail -n 1 "$out/backend_order.md")

counts=$(tail -n 1 "$out/tests.log")
status=0
[ "$build" = ok ] || status=1
[ "$tests_status" -eq 0 ] || status=1
[ "$cuda_skips" -eq 0 ] || status=1
{
  echo "| check | result |"
  echo "| --- | --- |"
  echo "| device | $(sed -n 's/^device //p' "$out/environment.txt") |"
  echo "| CUDA extension built | $build |"
  echo "| tests | $counts |"
  echo "| GPU tests skipped | $cuda_skips (must be 0) |"
  echo "| benchmarks | $bench |"
  echo "| backend order | $order |"
  echo "| gpu_check | $([ $status -eq 0 ] && echo passed || echo FAILED) |"
} > "$out/summary.txt"
echo "== summary"
cat "$out/summary.txt"
exit $status
