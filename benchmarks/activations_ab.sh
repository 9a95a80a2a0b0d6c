#!/usr/bin/env bash
# Interleaved A/B at the AVX2 tier: our int4/int8 decode on float vs int8 activations
# (MIXTRAL_ACTIVATIONS) against llama.cpp's AVX2-only build on the same GGUFs, b=1 decode.
# Needs what benchmarks/compare.sh TIER=avx2 sets up (/tmp/venv-bench-avx2, /tmp/bench-models).
#   ROUNDS=3 WHAT=b1 benchmarks/activations_ab.sh
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-/tmp/venv-bench-avx2/bin/python}"
export BENCH_MODELS="${BENCH_MODELS:-/tmp/bench-models}" BENCH_OUT="${BENCH_OUT:-/tmp/ab-$(date -u +%H%M)}"
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
show() { python3 -c "
import json, sys
for line in sys.stdin:
    try: d = json.loads(line)
    except ValueError: continue
    print('$1', d.get('what'), round(d.get('tok_s', 0), 1))"; }
for r in $(seq 1 "${ROUNDS:-3}"); do
  for c in ${CONFIGS:-int4:float int4:int8 gguf:q4_0 int8:float int8:int8 gguf:q8_0}; do
    q=${c%%:*}; act=${c#*:}
    if [ "$q" = gguf ]; then
      "$PY" "$ROOT/benchmarks/anchors/bench_llamacpp.py" --gguf "$BENCH_MODELS/gguf/bench-$act.gguf" \
        --what "${WHAT:-b1}" --new-tokens 64 --tag "r$r" 2>/dev/null | show "$c"
    else
      MIXTRAL_ISA=avx2 MIXTRAL_ACTIVATIONS=$act LD_PRELOAD=$JEMALLOC "$ROOT/.venv/bin/python" \
        "$ROOT/benchmarks/anchors/bench_mixtral.py" --quant "$q" --what "${WHAT:-b1}" \
        --new-tokens 64 --tag "r$r" 2>/dev/null | show "$c"
    fi
  done
done
