#!/usr/bin/env bash
# One command: this engine vs HF transformers vs llama.cpp on the random-weights "bench" Mixtral,
# interleaved in one run, with the machine's memory-bandwidth roofline; prints the markdown table
# that goes into benchmarks/RESULTS.md.
#
#   benchmarks/compare.sh            # ROUNDS=3 by default; ~6 min a round on 2 cores
#   TIER=avx2 benchmarks/compare.sh  # every engine held to AVX2 code (see below)
#
# TIER (empty = native): which instruction sets every engine may use.
#   native  each engine as it runs here by default: ours at the machine's tier, PyTorch at its
#           own, llama.cpp built -march=native (no AMX) in /tmp/venv-bench.
#   avx2    the AVX2 tier (Haswell, Zen 1-3), emulated on this machine: our engine with
#           MIXTRAL_ISA=avx2 (its AVX2 paths; it carries the cap to PyTorch and oneDNN itself),
#           HF transformers with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, llama.cpp
#           built for AVX2 only (no AVX-512 instruction in it) in /tmp/venv-bench-avx2. This is
#           AVX2 code on this machine's cores, caches and memory, not an AVX2 CPU: a real one
#           has its own clocks, caches and bandwidth, so ratios carry over better than tok/s.
#   Every result line records the tier its process actually ran at ("tier", "isa").
# First run sets up the tier's venv (torch 2.13.0, transformers, gguf, llama-cpp-python built
# from its sdist: ~10-20 min on 2 busy cores, benchmarks/anchors/setup_anchor_env.sh), builds the bench model
# (HF layout) and its GGUFs (F32 F16 Q8_0 Q4_0 Q4_K_M).
# Env: TIER, PY (anchor venv python: HF, llama.cpp, roofline), MIXTRAL_PY (this project's venv
# python), BENCH_MODELS, BENCH_OUT (default /tmp/bench-results-<tier>-<time>), ROUNDS, CONFIGS,
# NEW_TOKENS, BENCH_THREADS.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$ROOT/benchmarks/anchors"
TIER="${TIER:-}"
case "$TIER" in
  ""|native)
    TIER=native
    PY="${PY:-/tmp/venv-bench/bin/python}"
    OURS_ENV=(); HF_ENV=()
    TIER_NOTE="native: every engine uses what this CPU has (ours at its own tier, PyTorch at its own, llama.cpp built -march=native without AMX)" ;;
  avx2)
    PY="${PY:-/tmp/venv-bench-avx2/bin/python}"
    OURS_ENV=(MIXTRAL_ISA=avx2)
    HF_ENV=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
    TIER_NOTE="avx2: AVX2 code on this machine, not an AVX2 CPU — this engine with MIXTRAL_ISA=avx2, HF transformers with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, llama.cpp built for AVX2 only (GGML_NATIVE=OFF, AVX/AVX2/FMA/F16C/BMI2, no AVX-512, no AMX; objdump finds no AVX-512 instruction in it). Same cores, caches and memory bandwidth as the native run: a real AVX2 CPU (Zen 3, Haswell) has its own, so compare ratios, not tok/s. The roofline is this machine's memory rate, measured uncapped" ;;
  *) echo "TIER=$TIER: use empty (native) or avx2" >&2; exit 2 ;;
esac
MIXTRAL_PY="${MIXTRAL_PY:-$ROOT/.venv/bin/python}"
export BENCH_MODELS="${BENCH_MODELS:-/tmp/bench-models}"
export BENCH_OUT="${BENCH_OUT:-/tmp/bench-results-$TIER-$(date -u +%Y%m%d-%H%M)}"
export BENCH_THREADS="${BENCH_THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
NEW_TOKENS="${NEW_TOKENS:-128}"
CONFIGS=(${CONFIGS:-mixtral:fp32 mixtral:bf16 mixtral:int8 mixtral:int4 hf:fp32 hf:bf16 gguf:f32 gguf:f16 gguf:q8_0 gguf:q4_0 gguf:q4_k_m})
# the caps must be in the environment before Python starts; none leaks into another engine's run
unset MIXTRAL_ISA ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA

if [ ! -x "$PY" ]; then
  if [ "$TIER" = avx2 ]; then TIER=avx2 "$HERE/setup_anchor_env.sh"; else TIER= "$HERE/setup_anchor_env.sh"; fi || exit 1
fi
[ -s "$BENCH_MODELS/bench/config.json" ] || "$PY" "$HERE/make_models.py"
[ -s "$BENCH_MODELS/gguf/bench-q4_k_m.gguf" ] || PY="$PY" "$HERE/convert_gguf.sh"
mkdir -p "$BENCH_OUT"
echo "tier $TIER -> $BENCH_OUT"
n=${#CONFIGS[@]}
for r in $(seq 1 "$ROUNDS"); do
  echo "=== round $r  $(date -u +%H:%M:%S)  load $(cut -d' ' -f1 /proc/loadavg)"
  # the roofline is the machine's memory rate, measured uncapped at every tier (AVX2 code can
  # stream memory as fast on 2 cores; and oneDNN capped to AVX2 runs its bf16 GEMM for minutes)
  "$PY" "$HERE/machine_roofline.py" --reps 3 --out "$BENCH_OUT/roofline-round$r.json" | grep -E "bw_"
  for i in $(seq 0 $((n - 1))); do
    c="${CONFIGS[$(( (i + r - 1) % n ))]}"   # rotate the order every round
    kind="${c%%:*}"; dt="${c#*:}"
    echo "--- $c  $(date -u +%H:%M:%S)"
    case "$kind" in
      mixtral) env "${OURS_ENV[@]}" "$MIXTRAL_PY" "$HERE/bench_mixtral.py" --quant "$dt" --tag "round$r" --new-tokens "$NEW_TOKENS" ;;
      hf) env "${HF_ENV[@]}" "$PY" "$HERE/bench_hf.py" --dtype "$dt" --tag "round$r" --new-tokens "$NEW_TOKENS" ;;
      gguf) "$PY" "$HERE/bench_llamacpp.py" --gguf "$BENCH_MODELS/gguf/bench-$dt.gguf" --tag "round$r" --new-tokens "$NEW_TOKENS" ;;
    esac 2>"$BENCH_OUT/$kind-$dt-round$r.log" | "$PY" "$HERE/show.py"
    rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
      echo "  FAILED (exit $rc), $BENCH_OUT/$kind-$dt-round$r.log ends:"; tail -5 "$BENCH_OUT/$kind-$dt-round$r.log" | sed 's/^/    /'
    fi
  done
done
{ echo "# Tier: $TIER"; echo; echo "$TIER_NOTE."; echo
  "$PY" "$HERE/summarize.py" --results "$BENCH_OUT"; } | tee "$BENCH_OUT/summary.md"
