#!/usr/bin/env bash
# GPU host: ML-1M pretraining runs side by side on one GPU (small model, the GPU has room), each a
# plain `pinfm pretrain` command. Usage: bash scripts/gpu/ml1m_sweep.sh EPOCHS  (results under $OUT)
set -uo pipefail
export PYTHONPATH=/root/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
E=${1:-200}
declare -A V
V[a]=""
V[b]="model.embedding.dim=128 model.trunk.d_model=128"
V[c]="data.num_negatives_per_row=64 model.loss.in_batch_negatives=4096"
V[d]="train.lr=0.002 parallel.embedding_lr=0.002"
for k in a b c d; do
  cmd="python3 -m pinfm_rec.cli pretrain --spec specs/pretrain/ml1m-gpu.yaml name=ml1m-$k train.epochs=$E train.eval_every_epochs=$((E / 4)) ${V[$k]}"
  echo "$cmd" > "runs_cmd_$k.txt"
  ( /usr/bin/time -f "wall %e s" $cmd > "ml1m_$k.log" 2>&1 ) &
done
wait
for k in a b c d; do
  { echo "\$ $(cat runs_cmd_$k.txt)"; grep -E "valid \{|final|wall |Error" "ml1m_$k.log" | cut -c1-700; } >> "$OUT/ml1m_sweep.log"
  cp "runs/ml1m-$k/results.json" "$OUT/ml1m_$k.json" 2>/dev/null || true
done
cat "$OUT/ml1m_sweep.log"
