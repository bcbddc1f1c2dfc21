#!/usr/bin/env bash
# GPU host, after the fbgemm_gpu/torchrec wheels are in /root/site (README "GPU install"):
# install pinfm_rec, run `pinfm smoke`, then time 2 epochs of ML-1M to size the ML-1M runs.
# Usage: PINFM_DATA_DIR=/root/data bash scripts/gpu/smoke_and_calibrate.sh  (writes under $OUT)
set -uo pipefail
export PYTHONPATH=/root/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/smoke.log"
python3 -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, 'fbgemm_gpu', fbgemm_gpu.__version__)" | tee -a "$OUT/smoke.log"
echo "\$ pinfm smoke" | tee -a "$OUT/smoke.log"
python3 -m pinfm_rec.cli smoke 2>&1 | grep -v "TBE=\|\[AMD\|Feature Gates" | tee -a "$OUT/smoke.log"
echo "== calibrate: 2 epochs ML-1M" | tee "$OUT/calib.log"
python3 -m pinfm_rec.cli pretrain --spec specs/pretrain/ml1m-gpu.yaml name=calib train.epochs=2 train.eval_every_epochs=0 \
  checkpoint.every_steps=0 checkpoint.resume=false checkpoint.on_existing=overwrite 2>&1 | grep -E "step |final|Error|error" | cut -c1-400 | tee -a "$OUT/calib.log"
