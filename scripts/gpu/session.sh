#!/usr/bin/env bash
# GPU host, one call after the wheels are installed in /root/site (README "GPU install"):
# pinfm smoke (recorded verbatim) -> fine-tuning throughput (dedup+DCAT vs flat) -> ML-1M runs side by
# side. Usage: bash scripts/gpu/session.sh EPOCHS "overrides run 1" "overrides run 2" ...  (results in $OUT)
set -uo pipefail
export PYTHONPATH=/root/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /root/data
cp -r .gpudata/* /root/data/ 2>/dev/null || true
export PINFM_DATA_DIR=/root/data
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, 'fbgemm_gpu', fbgemm_gpu.__version__, 'torchrec', torchrec.__version__)"
  echo "\$ pinfm smoke"; } > "$OUT/smoke.log" 2>&1
python3 -m pinfm_rec.cli smoke 2>&1 | grep -v "TBE=\|\[AMD\|Feature Gates" >> "$OUT/smoke.log"
echo "\$ python3 -m pinfm_rec.train.finetune_bench --out \$OUT/finetune_bench.json" > "$OUT/finetune_bench.log"
timeout 150 python3 -m pinfm_rec.train.finetune_bench --out "$OUT/finetune_bench.json" 2>&1 \
  | grep -v "TBE=\|\[AMD\|Feature Gates\|Warning\|warn" >> "$OUT/finetune_bench.log"
E=${1:-100}; shift
[ $# -gt 0 ] && timeout ${SWEEP_TIMEOUT:-420} bash scripts/gpu/ml1m_sweep.sh "$E" "$@"
tail -5 "$OUT/smoke.log" "$OUT/finetune_bench.log"
