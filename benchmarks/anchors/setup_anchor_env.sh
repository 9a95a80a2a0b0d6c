#!/usr/bin/env bash
# The anchors' environment: a venv with torch 2.13.0 (CPU), transformers, gguf and
# llama-cpp-python built from its sdist (the same sdist's llama.cpp converts the GGUFs).
#
#   benchmarks/anchors/setup_anchor_env.sh            # /tmp/venv-bench: llama.cpp built native
#   TIER=avx2 benchmarks/anchors/setup_anchor_env.sh  # /tmp/venv-bench-avx2: llama.cpp AVX2-only
#
# TIER (empty) — native: -DGGML_NATIVE=ON (-march=native), for the machine it is built on, so
#   it uses what that CPU has (AVX-512, VNNI, BF16 ...) and nothing it lacks (the binary is not
#   for other machines). AMX stays off: on AMX Xeons the native build's CPU_REPACK/AMX buffers
#   segfaulted on quantized GGUFs (shared/reference/anchors-cpu.md). With GGML_NATIVE=ON ggml
#   ignores its GGML_AMX_* options (-march=native alone decides), so the AMX ISA is also taken
#   away from the compiler (-mno-amx-*: GCC and Clang let an explicit -mno-X win over -march).
# TIER=avx2 — the AVX2 tier (Haswell, Zen 1-3): GGML_NATIVE=OFF, SSE4.2 AVX AVX2 FMA F16C BMI2
#   on, every AVX-512 option, AVX-VNNI and AMX off. Checked after the build: the ggml libraries
#   must hold no zmm register (no AVX-512 instruction) at all; the script fails if they do.
# Env: TIER, VENV (default /tmp/venv-bench or /tmp/venv-bench-<tier>), LLAMA_CMAKE_ARGS
#   (replaces the tier's CMake options), SDIST_DIR (/tmp/llama-sdist).
# torch comes first as torch==2.13.0 (its CPU wheel lies on this machine; a plain `torch` would
# pull the CUDA build). Rerunning rebuilds llama-cpp-python in the existing venv.
set -euo pipefail
TIER="${TIER:-}"
case "$TIER" in
  ""|native) TIER=""; VENV="${VENV:-/tmp/venv-bench}" ;;
  avx2) VENV="${VENV:-/tmp/venv-bench-avx2}" ;;
  *) echo "TIER=$TIER: use empty (native) or avx2" >&2; exit 2 ;;
esac
SDIST_DIR="${SDIST_DIR:-/tmp/llama-sdist}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q numpy transformers safetensors accelerate gguf sentencepiece protobuf psutil \
  typing-extensions diskcache jinja2

mkdir -p "$SDIST_DIR"
if ! ls "$SDIST_DIR"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  "$VENV/bin/pip" download -q --no-binary :all: --no-deps llama-cpp-python -d "$SDIST_DIR"
fi
SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-*.tar.gz | sort -V | tail -1)"
SRC="${SDIST%.tar.gz}"
[ -d "$SRC" ] || tar xzf "$SDIST" -C "$SDIST_DIR"   # convert_gguf.sh uses its vendor/llama.cpp

NO_AMX="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ -z "$TIER" ]; then
  ARGS="-DGGML_NATIVE=ON $NO_AMX -DLLAVA_BUILD=OFF"
  # with GGML_NATIVE the GGML_AMX_* options are not read: keep AMX from the compiler itself
  if echo 'int main(void){return 0;}' | cc -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 \
       -x c -o /dev/null - 2>/dev/null; then
    export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  fi
else
  ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
-DGGML_AVX512_BF16=OFF $NO_AMX -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DLLAVA_BUILD=OFF"
fi
ARGS="${LLAMA_CMAKE_ARGS:-$ARGS}"
echo "llama-cpp-python $(basename "$SDIST") into $VENV, tier ${TIER:-native}: CMAKE_ARGS=$ARGS" \
  "CFLAGS=${CFLAGS:-}"
# --no-cache-dir: pip caches the wheel it builds from this sdist under the sdist's name alone, so
# a second venv would get the first venv's build whatever its CMAKE_ARGS.
CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$VENV/bin/pip" install -q --no-cache-dir --force-reinstall --no-deps "$SDIST"

LIBDIR="$("$VENV/bin/python" -c 'import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))')"
INFO="$("$VENV/bin/python" -c 'import llama_cpp as L; print(L.llama_print_system_info().decode())')"
{ echo "tier=${TIER:-native}"; echo "sdist=$(basename "$SDIST")"; echo "cmake_args=$ARGS"
  echo "cflags=${CFLAGS:-}"; echo "system_info=$INFO"; } > "$VENV/llama-build.txt"
echo "llama.cpp system info: $INFO"
if [ "$TIER" = avx2 ]; then
  # AVX-512 code (EVEX) names zmm registers, the 16 extra ymm/xmm registers (16-31) or the k
  # mask registers, or is one of the EVEX-only instructions below even on ymm/xmm (AVX512VL);
  # an AVX2 build must hold none of them.
  evex_only='kmov|kand|kor|kxor|knot|kshift|kortest|ktest|vpternlog|vpermt2|vpermi2|vrcp14|vrsqrt14|vscalef|vrndscale|vgetexp|vgetmant|vfixupimm|vpcompress|vpexpand|vcompress|vexpand|vpmov[a-z]*2m|vpmovm2|vpbroadcastm|vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16|vpro[lr][dq]|vpopcnt[bwdq]|vpconflict|vplzcnt|vpmadd52|vpshufbitqmb|vpdpbusd|vpdpwssd'
  bad=0
  for so in "$LIBDIR"/libggml*.so "$LIBDIR"/libllama*.so; do
    [ -e "$so" ] || continue
    d="$(objdump -d --no-show-raw-insn "$so")"
    n_zmm=$(grep -c '%zmm' <<<"$d" || true)
    n_hi=$(grep -cE '%[xy]mm(1[6-9]|2[0-9]|3[01])\b' <<<"$d" || true)
    n_k=$(grep -cE '%k[0-7]\b' <<<"$d" || true)
    n_evex=$(grep -cE "^ *[0-9a-f]+:[[:space:]]+(\{[a-z]+\} *)?($evex_only)" <<<"$d" || true)
    n_ymm=$(grep -c '%ymm' <<<"$d" || true)
    echo "objdump $(basename "$so"): zmm $n_zmm, xmm/ymm16-31 $n_hi, k-mask $n_k, EVEX-only mnemonics $n_evex; (AVX2 ymm: $n_ymm instructions)"
    [ "$n_zmm$n_hi$n_k$n_evex" = 0000 ] || bad=1
  done
  echo "objdump_zmm_check=$([ $bad = 0 ] && echo pass || echo FAIL)" >> "$VENV/llama-build.txt"
  if [ $bad != 0 ]; then echo "AVX-512 instructions in the AVX2 build" >&2; exit 1; fi
fi
echo "done: $VENV ($(cat "$VENV/llama-build.txt" | tr '\n' ' '))"
