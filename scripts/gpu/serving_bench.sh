#!/usr/bin/env bash
# Serving load benchmark (issue 15) on one GPU, about 5 minutes, after the wheels are installed
# (README "GPU install"):
#   OUT=$OUT bash scripts/gpu/serving_bench.sh        # TESTS=1: also the serving tests on this host
#   OUT=$OUT bash scripts/gpu/serving_bench.sh --cuda-graphs   # every method through serve/graphs.py
# Writes $OUT/serving.json, $OUT/serving.md (copy both to docs/benchmarks/) and $OUT/serving_bench.log.
# The int8 GAUC delta is the CPU measurement on the synthetic fine-tuning data
# (docs/benchmarks/serving_quality.json, pinfm_rec.serve.bench.quality_of); the JSON is rewritten
# after every (L, C), so a cut run keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -d /root/site ] && export PYTHONPATH=/root/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.used --format=csv
if [ "${TESTS:-0}" = 1 ]; then
  timeout 240 python3 -m pytest -q -x tests/test_serve.py tests/test_serve_host.py > "$OUT/serve_tests.log" 2>&1; tail -3 "$OUT/serve_tests.log"
fi
cp docs/benchmarks/serving.md "$OUT/serving.md"  # --md rewrites only its <!-- bench:begin/end --> region
timeout "${BENCH_TIMEOUT:-420}" python3 -m pinfm_rec.serve.bench --out "$OUT/serving.json" --md "$OUT/serving.md" \
  --quality-json docs/benchmarks/serving_quality.json "$@" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/serving_bench.log"
python3 - "$OUT/serving.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ("device", "cands_per_s_speedup_vs_dup_L2048_C256", "cands_per_s_speedup_vs_flex_L2048_C256",
                             "p99_ms_L2048_C256", "int8_table_memory_ratio", "int8_gauc_delta")})
PY
