#!/usr/bin/env bash
# GPU host: pretraining runs side by side on one GPU (small models: the GPU has room), each a plain
# `pinfm pretrain` command; every configuration runs once per seed. Usage:
#   SEEDS="42 7 1" SPEC=specs/pretrain/ml1m-gpu.yaml bash scripts/gpu/ml1m_sweep.sh \
#       "label1|overrides of config 1" "label2|overrides of config 2" ...
# Results: $OUT/ml1m_<label>_s<seed>.json (results.json of the run) and $OUT/ml1m_sweep.log
# (command, valid evaluations, final line and wall time of every run).
set -uo pipefail
[ -d /root/site ] && export PYTHONPATH=/root/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SPEC=${SPEC:-specs/pretrain/ml1m-gpu.yaml}
SEEDS=${SEEDS:-42}
# $OUT/sweep.pid while this sweep runs: what `round.sh` waits on (scripts/gpu/sweep_wait.sh). A
# `pgrep -f ml1m_sweep.sh` wait also matched the shell of any command that named this script
# (2026-12-06: a call that started the sweep itself waited out its whole 525 s, 200 s after the runs ended)
echo $$ > "$OUT/sweep.pid"
trap 'rm -f "$OUT/sweep.pid"' EXIT
names=()
for cfg in "$@"; do
  label=${cfg%%|*}; ov=${cfg#*|}
  for s in $SEEDS; do
    name="ml1m-$label-s$s"
    names+=("$name")
    cmd="python3 -m pinfm_rec.cli pretrain --spec $SPEC name=$name seed=$s checkpoint.resume=false checkpoint.on_existing=overwrite checkpoint.every_steps=0 $ov"
    echo "$cmd" > "runs_cmd_$name.txt"
    ( /usr/bin/time -f "wall %e s" $cmd > "run_$name.log" 2>&1 ) &
  done
done
wait
for name in "${names[@]}"; do
  { echo "\$ $(cat runs_cmd_$name.txt)"; grep -aE "valid|wall |rror|test " "run_$name.log" | cut -c1-400 | tail -30
    cat "runs/$name/log.txt" 2>/dev/null | grep -aE "Error|error" | tail -3; } >> "$OUT/ml1m_sweep.log"
  cp "runs/$name/results.json" "$OUT/${name//-/_}.json" 2>/dev/null || true
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = []
for p in sorted(glob.glob(os.path.join(sys.argv[1], "ml1m_*_s*.json"))):
    r = json.load(open(p))
    rows.append((os.path.basename(p)[5:-5], r.get("valid_hr@10"), r.get("valid_ndcg@10"), r.get("test_hr@10"),
                 r.get("test_ndcg@10"), r.get("steps"), round(r.get("wall_s", 0))))
print("run | valid hr@10 | valid ndcg@10 | test hr@10 | test ndcg@10 | steps | wall s")
for row in rows:
    print(" | ".join(str(x) for x in row))
PY
