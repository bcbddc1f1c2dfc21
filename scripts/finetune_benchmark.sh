#!/usr/bin/env bash
# Fine-tuning comparison on one dataset: pretrain the encoder on the ranking data's pretraining
# corpus (pre-valid events only), then fine-tune DLRM alone / + random-init encoder / + pretrained
# encoder with the same ranker, seeds and early stopping (best valid GAUC; test read once on that
# model), and print the test metrics. Usage (data under $PINFM_DATA_DIR):
#   SEEDS="0 1 2" INITS="none random pretrained" bash scripts/finetune_benchmark.sh mind|movielens [overrides]
# Runs: runs/ft-<ds>-<init>-s<seed>/results.json (read by scripts/finetune_report.py).
# SKIP_PRETRAIN=1 reuses runs/$PRE_RUN/encoder (PRE_RUN defaults to pre-<ds>).
# MIND pretrains on the histories-only corpus (scripts/history_corpus.py: the default corpus holds the
# train clicks, i.e. the fine-tuning train labels).
set -euo pipefail
DS=${1:?mind|movielens}; shift || true
PINFM=${PINFM:-.venv/bin/pinfm}
SEEDS=${SEEDS:-0 1 2}
INITS=${INITS:-none random pretrained}
FT=specs/finetune/$DS.yaml
PRE=specs/pretrain/$([ "$DS" = mind ] && echo mind || echo movielens-rank).yaml
DIR=$($PINFM prepare-ranking --spec "$FT" 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['pretrain_dir'])")
if [ "$DS" = mind ]; then DIR=$(.venv/bin/python scripts/history_corpus.py "$(dirname "$DIR")"); fi
echo "pretraining corpus: $DIR"
PRE_RUN=${PRE_RUN:-pre-$DS}
if [ -z "${SKIP_PRETRAIN:-}" ]; then
  $PINFM pretrain --spec "$PRE" name=$PRE_RUN data.path="$DIR" checkpoint.resume=false checkpoint.on_existing=overwrite 2>&1 | tail -n 2 | cut -c1-300
fi
for seed in $SEEDS; do
  for init in $INITS; do
    $PINFM finetune --spec "$FT" name=ft-$DS-$init-s$seed seed=$seed encoder.init=$init \
      encoder.checkpoint=runs/$PRE_RUN/encoder checkpoint.resume=false checkpoint.on_existing=overwrite "$@" \
      2>&1 | tail -n 1 | cut -c1-300
  done
done
python3 - "$DS" "$SEEDS" "$INITS" <<'PY'
import json, sys
ds, seeds, inits = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print(f"| {ds} | seed | valid GAUC | test GAUC | test AUC | test logloss | best epoch |")
print("|---|---|---|---|---|---|---|")
for init in inits:
    for s in seeds:
        r = json.load(open(f"runs/ft-{ds}-{init}-s{s}/results.json"))
        print(f"| {init} | {s} | {r['valid_gauc']:.4f} | {r['test_gauc']:.4f} | {r['test_auc']:.4f} | "
              f"{r['test_logloss']:.4f} | {r.get('best_epoch', '-')} |")
PY
