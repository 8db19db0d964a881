#!/usr/bin/env bash
# Runs the workloads behind docs/benchmarks.md and writes their JSON results to docs/results/ (or $OUT):
# loraplex served over HTTP and in-process, base only and spread over 8/32/128 adapters; latency against
# the request rate; the transformers + peft baselines on the same workload. Then draws the plots.
#   bash scripts/bench/run_bench_suite.sh            # ~10 min on 2 CPU cores
# Environment: DTYPE (bfloat16), PROMPTS (64), OUTPUT (32), PORT (8321), PEFT_SEQUENTIAL (1: run it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/results}
DTYPE=${DTYPE:-bfloat16}
PROMPTS=${PROMPTS:-64}
OUTPUT=${OUTPUT:-32}
PORT=${PORT:-8321}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
ADAPTERS=$(mktemp -d /tmp/loraplex-bench-adapters-XXXX)
# the same random rank-8 q/v adapters bench offline and the peft baselines make (bench-a<i>, seed i)
"$PY" - "$ADAPTERS" <<'PYEOF'
import sys
from pathlib import Path
from loraplex.bench.offline import synthetic_adapters
from loraplex.engine.default_model import ensure_default_model
from loraplex.engine.llm_engine import _read_model_config
class Cfg:
    model_config = _read_model_config(str(ensure_default_model()))
synthetic_adapters(Cfg, Path(sys.argv[1]), 128, 8, ("q_proj", "v_proj"))
PYEOF
names() { seq 0 $(($1 - 1)) | sed 's/^/bench-a/' | paste -sd, -; }
MODULES=$(for i in $(seq 0 127); do echo -n "bench-a$i=$ADAPTERS/bench-a$i "; done)
WORKLOAD="--num-prompts $PROMPTS --input-len 64 --output-len $OUTPUT --seed 0"

.venv/bin/loraplex serve --port "$PORT" --dtype "$DTYPE" --max-num-seqs 64 --max-loras 64 --max-cpu-loras 160 \
    --no-enable-training --served-model-name SmolLM2-135M-Instruct --adapter-dir "$ADAPTERS/store" \
    --lora-modules $MODULES > "$ADAPTERS/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "127.0.0.1:$PORT/ready" >/dev/null && break; sleep 1; done
URL="http://127.0.0.1:$PORT"
.venv/bin/loraplex bench serve --base-url "$URL" --model SmolLM2-135M-Instruct --num-prompts 8 --output-len 4 \
    --adapters "$(names 128)" > /dev/null   # warm-up: every adapter into the host tier once

for n in 0 8 32 128; do
  adapters=""; [ "$n" -gt 0 ] && adapters="$(names "$n")"
  .venv/bin/loraplex bench serve --base-url "$URL" --model SmolLM2-135M-Instruct --adapters "$adapters" \
      $WORKLOAD --label "loraplex serve" --result-file "$OUT/serve-adapters-$n.json"
done
for rate in 1 2 4 8; do
  .venv/bin/loraplex bench serve --base-url "$URL" --model SmolLM2-135M-Instruct --adapters "$(names 8)" \
      --adapter-dist powerlaw --num-prompts 32 --input-len 64 --output-len "$OUTPUT" --seed 0 \
      --request-rate "$rate" --label "loraplex serve" --result-file "$OUT/serve-rate-$rate.json"
done
kill $SERVER; wait $SERVER 2>/dev/null || true

for n in 0 8 32 128; do
  .venv/bin/loraplex bench offline --dtype "$DTYPE" --max-num-seqs 64 --max-loras 64 --num-adapters "$n" \
      --served-model-name SmolLM2-135M-Instruct --log-level warning $WORKLOAD --label "loraplex offline" \
      --result-file "$OUT/offline-adapters-$n.json"
done
for n in 8 32; do
  "$PY" scripts/bench/bench_peft_baselines.py --mode batched --batch-size 16 --dtype "$DTYPE" --num-adapters "$n" \
      $WORKLOAD --label "peft batched (adapter_names=)" --result-file "$OUT/peft-batched-adapters-$n.json"
done
if [ "${PEFT_SEQUENTIAL:-1}" = 1 ]; then
  "$PY" scripts/bench/bench_peft_baselines.py --mode sequential --dtype "$DTYPE" --num-adapters 8 \
      $WORKLOAD --label "peft sequential (set_adapter)" --result-file "$OUT/peft-sequential-adapters-8.json"
fi
"$PY" scripts/bench/plot_results.py "$OUT"
