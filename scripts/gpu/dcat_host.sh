#!/usr/bin/env bash
# DCAT eager host time on one GPU (issue 15), one command, about 3 minutes, after the wheels are
# installed (README "GPU install"):
#   OUT=$OUT bash scripts/gpu/dcat_host.sh          # BENCH=1: also the full dcat bench (+4 min)
# 1. the GPU tests of the launch paths (cached-descriptor launch vs the default, bit for bit;
#    direct launch; dispatch), 2. host us/call per anchor shape with the cached-descriptor launch
#    off and on in one process (kernels/dcat/hostgpu.py), 3. the CPU proxy of the same host path
#    on this host (kernels/dcat/hostbench.py, kernel launch stubbed) for comparison with the
#    numbers recorded without a GPU. Writes $OUT/dcat_host.json, $OUT/dcat_hostbench.json,
#    $OUT/dcat_host.log (and with BENCH=1 $OUT/dcat.json, $OUT/dcat_bench.log).
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -d /root/site ] && export PYTHONPATH=/root/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET PINFM_DCAT_CACHED_LAUNCH  # compiled kernels; the switch at its default (on)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "== GPU tests (launch paths)"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_dcat_dispatch.py tests/test_dcat_launch.py \
    tests/test_dcat_triton.py -k "cached or direct or gluon or plan" 2>&1 | tail -5
  echo "== host us/call, cached-descriptor launch off / on"
  timeout 300 python3 -m pinfm_rec.kernels.dcat.hostgpu --out "$OUT/dcat_host.json" 2>&1 \
    | grep -v "Warning\|warn("
  echo "== CPU proxy on this host (launch stubbed)"
  timeout 200 python3 -m pinfm_rec.kernels.dcat.hostbench --n 1000 --json "$OUT/dcat_hostbench.json" 2>&1 | tail -6
} 2>&1 | tee "$OUT/dcat_host.log"
if [ "${BENCH:-0}" = 1 ]; then
  timeout 420 python3 -m pinfm_rec.kernels.dcat.bench --correctness quick --profile-host --no-model \
    --out "$OUT/dcat.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/dcat_bench.log" | tail -12
fi
