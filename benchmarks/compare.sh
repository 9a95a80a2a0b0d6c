#!/usr/bin/env bash
# One command: this engine vs HF transformers vs llama.cpp on the random-weights "bench" Mixtral,
# interleaved in one run, with the machine's memory-bandwidth roofline; prints the markdown table
# that goes into benchmarks/RESULTS.md.
#
#   benchmarks/compare.sh            # ROUNDS=3 by default; ~6 min a round on 2 cores
#
# First run sets up /tmp/venv-bench (torch 2.13.0, transformers, gguf, llama-cpp-python built from
# its sdist: ~5 min), builds the bench model (HF layout) and its GGUFs (F32 F16 Q8_0 Q4_0 Q4_K_M).
# Env: PY (anchor venv python), MIXTRAL_PY (this project's venv python), BENCH_MODELS,
# BENCH_OUT, ROUNDS, CONFIGS, NEW_TOKENS, BENCH_THREADS.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$ROOT/benchmarks/anchors"
PY="${PY:-/tmp/venv-bench/bin/python}"
MIXTRAL_PY="${MIXTRAL_PY:-$ROOT/.venv/bin/python}"
export BENCH_MODELS="${BENCH_MODELS:-/tmp/bench-models}"
export BENCH_OUT="${BENCH_OUT:-/tmp/bench-results-$(date -u +%Y%m%d-%H%M)}"
export BENCH_THREADS="${BENCH_THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
NEW_TOKENS="${NEW_TOKENS:-128}"
CONFIGS=(${CONFIGS:-mixtral:fp32 mixtral:bf16 mixtral:int8 mixtral:int4 hf:fp32 hf:bf16 gguf:f32 gguf:f16 gguf:q8_0 gguf:q4_0 gguf:q4_k_m})

if [ ! -x "$PY" ]; then "$HERE/setup_anchor_env.sh"; fi
[ -s "$BENCH_MODELS/bench/config.json" ] || "$PY" "$HERE/make_models.py"
[ -s "$BENCH_MODELS/gguf/bench-q4_k_m.gguf" ] || PY="$PY" "$HERE/convert_gguf.sh"
mkdir -p "$BENCH_OUT"
n=${#CONFIGS[@]}
for r in $(seq 1 "$ROUNDS"); do
  echo "=== round $r  $(date -u +%H:%M:%S)  load $(cut -d' ' -f1 /proc/loadavg)"
  "$PY" "$HERE/machine_roofline.py" --reps 3 --out "$BENCH_OUT/roofline-round$r.json" | grep -E "bw_"
  for i in $(seq 0 $((n - 1))); do
    c="${CONFIGS[$(( (i + r - 1) % n ))]}"   # rotate the order every round
    kind="${c%%:*}"; dt="${c#*:}"
    echo "--- $c  $(date -u +%H:%M:%S)"
    case "$kind" in
      mixtral) "$MIXTRAL_PY" "$HERE/bench_mixtral.py" --quant "$dt" --tag "round$r" --new-tokens "$NEW_TOKENS" ;;
      hf) "$PY" "$HERE/bench_hf.py" --dtype "$dt" --tag "round$r" --new-tokens "$NEW_TOKENS" ;;
      gguf) "$PY" "$HERE/bench_llamacpp.py" --gguf "$BENCH_MODELS/gguf/bench-$dt.gguf" --tag "round$r" --new-tokens "$NEW_TOKENS" ;;
    esac 2>/dev/null | "$PY" "$HERE/show.py"
  done
done
"$PY" "$HERE/summarize.py" --results "$BENCH_OUT" | tee "$BENCH_OUT/summary.md"
