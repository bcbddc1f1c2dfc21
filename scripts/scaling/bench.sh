#!/usr/bin/env bash
# Scale-out measurements (issue 17; docs/benchmarks/scaling.md). From the repo root on a GPU host
# with the GPU wheels installed (README "GPU install"; /root/site is put on PYTHONPATH if present):
#
#   bash scripts/scaling/bench.sh start    # background: resharding checks, weak-scaling rows, ML-1M quality at 1 and N
#   bash scripts/scaling/bench.sh wait     # waits up to WAIT_S (540 s) and shows progress; repeat until DONE
#   bash scripts/scaling/bench.sh longseq  # one GPU, foreground, ~8 min: max_len limit with/without checkpointing
#   bash scripts/scaling/bench.sh reshard  # foreground: only the GPU resharding checks
#   bash scripts/scaling/bench.sh tiny     # CPU / gloo, 1 and 2 ranks: the code path, in ~1 min
#
# Every GPU list is cut to the GPUs present (nvidia-smi -L). Results go to $OUT (default /tmp/out):
# scaling.json (+ docs/benchmarks/scaling.json in the checkout), reshard.jsonl, long_seq.json, logs.
# ML-1M rows need the SASRec file under $PINFM_DATA_DIR (default /root/data): ml-1m/sasrec/ml-1m.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -d /root/site ] && export PYTHONPATH=/root/site:${PYTHONPATH:-}
export PINFM_DATA_DIR=${PINFM_DATA_DIR:-/root/data} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUNS=${RUNS:-runs/scaling}
STEPS=${STEPS:-100}
QUALITY=${QUALITY:-1}  # 0: skip the ML-1M quality runs (whole recipe at 1 and N GPUs)
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
LOG=$OUT/scaling_bench.log
DONE=$RUNS/DONE

fit() {  # the comma-separated GPU counts of $1 that this host has
  local out=() g
  for g in ${1//,/ }; do [ "$g" -le "$NGPU" ] && out+=("$g"); done
  (IFS=,; echo "${out[*]}")
}

reshard() {  # N->M resume on GPU (nccl), exact full-tensor comparison
  local pair n m
  for pair in 8:2 2:1 1:4 4:2 2:4; do
    n=${pair%:*}; m=${pair#*:}
    { [ "$n" -le "$NGPU" ] && [ "$m" -le "$NGPU" ]; } || continue
    $PY scripts/scaling/reshard_check.py --gpu --save "$n" --load "$m" --out "runs/reshard-$n-$m" \
      --save-override model.embedding.item.sharding=row_wise --load-override model.embedding.item.sharding=table_wise \
      data.synthetic.num_users=3000 data.batch_size=16 | tail -1 | tee -a "$OUT/reshard.jsonl"
  done
}

bench() {
  local part cfg gpus
  # most telling rows first: a budget cut leaves the headline configs measured
  for part in "pretrain-50m-rowwise:1,2,4,8" "finetune-dcat:1,2,4,8" "pretrain-50m-tablewise:2,8" \
              "pretrain-ml1m:1,8"; do
    cfg=${part%%:*}; gpus=$(fit "${part#*:}")
    [ -n "$gpus" ] || continue
    if [ "$cfg" = pretrain-ml1m ] && [ ! -f "$PINFM_DATA_DIR/ml-1m/sasrec/ml-1m.txt" ]; then
      echo "skip $cfg: no $PINFM_DATA_DIR/ml-1m/sasrec/ml-1m.txt"; continue
    fi
    $PY scripts/scaling/bench.py run --configs "$cfg" --gpus "$gpus" --steps "$STEPS" --runs "$RUNS"
    $PY scripts/scaling/bench.py summarise --runs "$RUNS" --out "$OUT/scaling.json"  # after every part
  done
  # the same ML-1M quality on N GPUs as on 1: the whole recipe at 1 and at all GPUs (lr x sqrt(N))
  if [ "$QUALITY" = 1 ] && [ -f "$PINFM_DATA_DIR/ml-1m/sasrec/ml-1m.txt" ] && [ "$NGPU" -ge 1 ]; then
    local q=1; [ "$NGPU" -gt 1 ] && q="1,$NGPU"
    $PY scripts/scaling/bench.py quality --gpus "$q" --runs "$RUNS-quality" --out "$OUT/scaling_quality.json"
    $PY scripts/scaling/bench.py summarise --runs "$RUNS" --out "$OUT/scaling.json" --quality "$OUT/scaling_quality.json"
  fi
  [ -f "$OUT/scaling.json" ] && cp "$OUT/scaling.json" docs/benchmarks/scaling.json
}

case "${1:-}" in
start)
  rm -rf "$RUNS" "$RUNS-quality" runs/reshard-*; mkdir -p "$RUNS"; : > "$OUT/reshard.jsonl"
  echo "GPUs: $NGPU; log: $LOG"
  setsid nohup bash -c "$(declare -f fit reshard bench); NGPU=$NGPU PY=$PY OUT=$OUT RUNS=$RUNS STEPS=$STEPS QUALITY=$QUALITY; \
    reshard; bench; touch $DONE" > "$LOG" 2>&1 < /dev/null &
  sleep 5; tail -5 "$LOG"
  ;;
wait)
  for _ in $(seq 1 "${WAIT_S:-540}"); do [ -f "$DONE" ] && break; sleep 1; done
  grep -E '^\{|ex/s|FAILED|skip|written|quality x' "$LOG" | tail -30
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  if [ -f "$DONE" ]; then echo DONE; cat "$OUT/scaling.json" | head -40; else echo "still running"; fi
  ;;
longseq)
  timeout 520 $PY scripts/scaling/long_seq.py --budget-s 420 --out "$OUT/long_seq.json" 2>&1 | tee "$OUT/long_seq.log" | tail -12
  ;;
reshard) : > "$OUT/reshard.jsonl"; reshard ;;
tiny)
  $PY scripts/scaling/bench.py run --tiny --gpus 1,2 --steps 6 --runs runs/scaling-tiny --out "$OUT/scaling-tiny.json"
  CUDA_VISIBLE_DEVICES= $PY scripts/scaling/reshard_check.py --tiny --save 2 --load 1 --out runs/reshard-tiny | tail -1
  ;;
*) echo "usage: $0 start|wait|longseq|reshard|tiny" >&2; exit 2 ;;
esac
