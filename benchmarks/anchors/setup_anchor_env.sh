#!/usr/bin/env bash
# The anchors' environment: /tmp/venv-bench with torch 2.13.0 (CPU), transformers, gguf and
# llama-cpp-python built from its sdist. AVX-512 without AMX: on AMX Xeons the native build's
# CPU_REPACK/AMX buffers segfaulted on quantized GGUFs (anchors-cpu.md); this build runs them.
set -euo pipefail
python3 -m venv /tmp/venv-bench
/tmp/venv-bench/bin/pip install -q torch==2.13.0
/tmp/venv-bench/bin/pip install -q numpy transformers safetensors accelerate gguf sentencepiece protobuf psutil
mkdir -p /tmp/llama-sdist
/tmp/venv-bench/bin/pip download -q --no-binary :all: --no-deps llama-cpp-python -d /tmp/llama-sdist
tar xzf /tmp/llama-sdist/llama_cpp_python-*.tar.gz -C /tmp/llama-sdist
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/venv-bench/bin/pip install -q "$(ls /tmp/llama-sdist/llama_cpp_python-*.tar.gz | head -1)"
