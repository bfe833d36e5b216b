#!/usr/bin/env bash
# One prepared check of the GPU path, for a lent GPU machine (torch with CUDA, numpy, h5py,
# ninja, pybind11, pytest; neither mlflow nor dvc):
#   1. build the extension with its CUDA kernels (python setup.py build_ext --inplace);
#   2. the op tests on CUDA with the native ops required (MLSYS_REQUIRE_NATIVE=1), which
#      include torch.library.opcheck of both ops on CUDA;
#   3. benchmarks/method2.py and benchmarks/pipeline.py at the paper configuration.
# Every log and result lands in OUTDIR. Sized to finish in ~8 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh OUTDIR          # on the GPU machine
#   benchmarks/gpu_check.sh --cpu OUTDIR    # the same steps at a small size on a CPU (48 s on 2 idle cores)
set -euo pipefail
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--cpu] OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then py=.venv/bin/python; fi
export PYTHONUNBUFFERED=1 MLSYS_PROGRESS=0
status=0
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"; else
    echo "   FAILED ($((SECONDS - t0)) s); last lines of $out/$name.log:"; tail -n 20 "$out/$name.log"; status=1; fi
}
"$py" - >"$out/machine.txt" 2>&1 <<'EOF' || true
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
cat "$out/machine.txt"
if [ $cpu = 1 ]; then
  # no rebuild on a CPU machine: the checkout's extension (make setup) is the one under test
  step op-tests env MLSYS_REQUIRE_NATIVE=1 "$py" -m pytest -q -x tests/test_ops.py
  step method2 "$py" benchmarks/method2.py --config cpu-small --images 1 --no-naive --json "$out/method2_cpu-small.json"
  step pipeline "$py" benchmarks/pipeline.py --config cpu-small --out "$out"
else
  step build env MLSYS_NO_CUDA=0 "$py" setup.py build_ext --inplace
  step op-tests env MLSYS_REQUIRE_NATIVE=1 "$py" -m pytest -q -x tests/test_ops.py
  step method2 "$py" benchmarks/method2.py --config paper --json "$out/method2_paper.json"
  step pipeline "$py" benchmarks/pipeline.py --config paper --out "$out"
fi
echo "results in $out: $(ls "$out" | tr '\n' ' ')"
exit $status
