#!/usr/bin/env bash
# Fine-tuning comparison on one dataset: pretrain the encoder on the ranking data's pretraining
# corpus (pre-valid events only), then fine-tune DLRM alone / + random-init encoder / + pretrained
# encoder, and print the test metrics. Usage (data under $PINFM_DATA_DIR):
#   bash scripts/finetune_benchmark.sh mind|movielens [extra overrides for all finetune runs]
set -euo pipefail
DS=${1:?mind|movielens}; shift || true
PINFM=${PINFM:-.venv/bin/pinfm}
FT=specs/finetune/$DS.yaml
PRE=specs/pretrain/$([ "$DS" = mind ] && echo mind || echo movielens-rank).yaml
DIR=$($PINFM prepare-ranking --spec "$FT" 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['pretrain_dir'])")
echo "pretraining corpus: $DIR"
$PINFM pretrain --spec "$PRE" name=pre-$DS data.path="$DIR" checkpoint.resume=false checkpoint.on_existing=overwrite 2>&1 | grep -E "final|Error" | cut -c1-300
for init in none random pretrained; do
  $PINFM finetune --spec "$FT" name=ft-$DS-$init encoder.init=$init encoder.checkpoint=runs/pre-$DS/encoder \
    checkpoint.resume=false checkpoint.on_existing=overwrite "$@" 2>&1 | grep -E "final|Error" | cut -c1-400
done
python3 - "$DS" <<'PY'
import json, sys
ds = sys.argv[1]
print(f"| {ds} | test AUC | test GAUC | test logloss | test AUC new items |")
print("|---|---|---|---|---|")
for init in ("none", "random", "pretrained"):
    r = json.load(open(f"runs/ft-{ds}-{init}/results.json"))
    print(f"| {init} | {r['test_auc']:.4f} | {r['test_gauc']:.4f} | {r['test_logloss']:.4f} | {r['test_new_auc']:.4f} |")
PY
