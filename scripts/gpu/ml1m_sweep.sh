#!/usr/bin/env bash
# GPU host: ML-1M pretraining runs side by side on one GPU (small models, the GPU has room), each a
# plain `pinfm pretrain` command. Usage:
#   bash scripts/gpu/ml1m_sweep.sh EPOCHS "overrides of run 1" "overrides of run 2" ...   (results under $OUT)
set -uo pipefail
export PYTHONPATH=/root/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
E=${1:-100}; shift
i=0
for ov in "$@"; do
  i=$((i + 1))
  cmd="python3 -m pinfm_rec.cli pretrain --spec specs/pretrain/ml1m-gpu.yaml name=ml1m-$i train.epochs=$E train.eval_every_epochs=$((E / 4)) checkpoint.resume=false checkpoint.every_steps=0 $ov"
  echo "$cmd" > "runs_cmd_$i.txt"
  ( /usr/bin/time -f "wall %e s" $cmd > "ml1m_$i.log" 2>&1 ) &
done
wait
for j in $(seq 1 $i); do
  { echo "\$ $(cat runs_cmd_$j.txt)"; grep -E "valid \{|final|wall |Error" "ml1m_$j.log" | cut -c1-600; } >> "$OUT/ml1m_sweep.log"
  cp "runs/ml1m-$j/results.json" "$OUT/ml1m_$j.json" 2>/dev/null || true
done
cat "$OUT/ml1m_sweep.log"
