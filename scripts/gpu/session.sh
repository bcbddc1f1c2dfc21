#!/usr/bin/env bash
# One GPU session in two calls, each under the device's 10-minute limit, after the wheels are
# installed (README "GPU install") and the data copied to /root/data (PINFM_DATA_DIR):
#   bash scripts/gpu/session.sh start    # ML-1M sweep in the background (setsid), then the test suite
#   bash scripts/gpu/session.sh finish   # waits for the sweep, GR-protocol evals, collects; DCAT bench
# The test suite needs a quiet machine: on 2026-12-04 it ran beside the 8 training runs and both
# halves hit their timeouts; run `bash scripts/gpu/test_suite.sh` alone when the suite is the goal.
# Results under $OUT: gpu_suite_{fast,slow}.txt/.log, ml1m_*.json, ml1m_sweep.log, ml1m_exclhist_*.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -d /root/site ] && export PYTHONPATH=/root/site:${PYTHONPATH:-}
export PINFM_DATA_DIR=${PINFM_DATA_DIR:-/root/data} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SW=/root/sweep; mkdir -p $SW
COMMON="train.epochs=120 train.eval_every_epochs=5 train.patience=4"
case "${1:-}" in
start)
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  (export OUT=$SW OMP_NUM_THREADS=2
   SEEDS="42 7 1" setsid nohup bash scripts/gpu/ml1m_sweep.sh \
     "h8d64|model.trunk.block=hstu model.trunk.n_layers=8 model.trunk.d_model=64 model.embedding.dim=64 model.trunk.dropout=0.2 $COMMON" \
     "h4d128|model.trunk.block=hstu model.trunk.n_layers=4 model.trunk.d_model=128 model.embedding.dim=128 model.trunk.dropout=0.3 $COMMON" \
     > $SW/sweep3.out 2>&1 < /dev/null &
   SEEDS=42 setsid nohup bash scripts/gpu/ml1m_sweep.sh \
     "t256|$COMMON" \
     "h8d64nowin|model.trunk.block=hstu model.trunk.n_layers=8 model.trunk.d_model=64 model.embedding.dim=64 model.trunk.dropout=0.2 data.train_windows=false $COMMON" \
     "rule|--spec specs/pretrain/sasrec.yaml train.epochs=120" \
     "rulesparse|--spec specs/pretrain/sasrec.yaml data.path=ml-1m/sasrec/ml-1m-sparse9.txt" \
     "rulesparseh|--spec specs/pretrain/sasrec.yaml data.path=ml-1m/sasrec/ml-1m-sparse9.txt model.trunk.block=hstu" \
     "ml1mrecipesparse|--spec specs/pretrain/sasrec.yaml data.path=ml-1m/sasrec/ml-1m-sparse9.txt data.max_len=200 model.trunk.max_len=200 model.trunk.d_model=256 model.embedding.dim=256 model.trunk.n_layers=3 model.trunk.n_heads=2 model.trunk.dropout=0.3" \
     > $SW/sweep1.out 2>&1 < /dev/null &)
  sleep 20; ls runs/ 2>/dev/null | head -20
  OUT=$OUT/fast SKIP_INSTALL=1 timeout 290 bash scripts/gpu/test_suite.sh tests -m "not slow" | tail -40
  OUT=$OUT/slow SKIP_INSTALL=1 timeout 250 bash scripts/gpu/test_suite.sh tests -m slow | tail -40
  for k in fast slow; do cp $OUT/$k/gpu_suite.txt $OUT/gpu_suite_$k.txt; cp $OUT/$k/gpu_suite.log $OUT/gpu_suite_$k.log; rm -rf $OUT/$k; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; ls runs/
  ;;
finish)
  for i in $(seq 1 ${WAIT_S:-400}); do
    pgrep -f ml1m_sweep.sh >/dev/null || break; sleep 1
  done
  pgrep -fa "pinfm_rec.cli pretrain" | cut -c1-200
  cat $SW/sweep1.out $SW/sweep3.out | tail -40
  cp $SW/ml1m_* $OUT/ 2>/dev/null
  for d in runs/ml1m-*; do
    n=$(basename $d)
    timeout 60 python3 -m pinfm_rec.cli eval --spec $d --json train.eval_exclude_history=true > $SW/eval_$n.log 2>&1
    python3 - $SW/eval_$n.log $OUT/ml1m_exclhist_${n//-/_}.json <<'PY'
import json, sys
t = open(sys.argv[1]).read(); i = t.rfind("\n{")
if i >= 0:
    json.dump(json.loads(t[i + 1:]), open(sys.argv[2], "w"), indent=1)
PY
  done
  ls $OUT
  ;;
*) echo "usage: $0 start|finish" >&2; exit 2;;
esac
