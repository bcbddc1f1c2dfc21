#!/usr/bin/env bash
# The whole test suite on a GPU host, one command (after the GPU wheels are installed, README
# "GPU install"; /root/site is added to PYTHONPATH when it exists):
#   bash scripts/gpu/test_suite.sh [pytest args, default: tests]   (writes under $OUT, default /tmp/out)
# Installs pinfm_rec editable (--no-deps), runs `pytest -v -ra tests` (-v: a run cut by a timeout still
# names every test it finished) (kernel tests compiled on
# CUDA: tests/conftest.py switches the Triton interpreter on only without CUDA), and writes
#   $OUT/gpu_suite.log  the full pytest output
#   $OUT/gpu_suite.txt  summary: date, device, driver, python/torch/triton/numpy/fbgemm_gpu/
#                       torchrec versions, pass/fail/skip/error counts, the failing test ids
# Exit status: pytest's. PYTHON picks the interpreter (default python3); SKIP_INSTALL=1 skips
# the editable install.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -d /root/site ] && export PYTHONPATH=/root/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET  # compiled kernels on the GPU; conftest decides
[ -n "${SKIP_INSTALL:-}" ] || $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || $PY -m pip install -q --no-deps -e . >/dev/null 2>&1 \
  || echo "warning: editable install failed; testing the tree through PYTHONPATH" >&2
export PYTHONPATH=$PWD:${PYTHONPATH:-}
t0=$(date +%s)
ARGS=("$@"); [ ${#ARGS[@]} -gt 0 ] || ARGS=(tests)
$PY -m pytest -v -ra --durations=25 -p no:cacheprovider "${ARGS[@]}" > "$OUT/gpu_suite.log" 2>&1
rc=$?
t1=$(date +%s)
{
  echo "GPU test suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/device: /' || echo "device: (nvidia-smi unavailable)"
  $PY - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for mod in ("torch", "triton", "numpy", "fbgemm_gpu", "torchrec", "torchmetrics", "torchx"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "not importable:", type(e).__name__)
import torch
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), "| capability",
          torch.cuda.get_device_capability(), "| devices", torch.cuda.device_count())
else:
    print("cuda: NOT available (the kernel tests ran in the Triton interpreter)")
EOF
  echo "command: pytest -q -ra ${ARGS[*]} (exit $rc, $((t1 - t0)) s)"
  echo "result: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$OUT/gpu_suite.log" | tail -1 | tr -d '=')"
  for k in passed failed error skipped xfailed; do
    n=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$OUT/gpu_suite.log" | tail -1 \
        | grep -oE "[0-9]+ ${k}" | grep -oE '^[0-9]+')
    echo "$k: ${n:-0}"
  done
  echo "--- not passed:"
  grep -E '^(FAILED|ERROR) ' "$OUT/gpu_suite.log" | cut -c1-300 || echo "(none)"
} > "$OUT/gpu_suite.txt" 2>&1
cat "$OUT/gpu_suite.txt"
exit $rc
