#!/usr/bin/env bash
# The GPU benchmark: run wherever a CUDA GPU is at hand and paste the output into
# benchmarks/RESULTS.md with the card's name. Needs torch with CUDA; nothing else of the test
# extras (it runs `python -m mixtral bench` from a checkout: PYTHONPATH=.).
#   benchmarks/gpu.sh            # bench model at fp32/bf16/int8/int4, batch 1 and 8; full 8x7B bf16
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
for quant in bf16 fp32 int8 int4; do
  for batch in 1 8; do
    "$PY" -m mixtral bench --device cuda --model bench --quant "$quant" --batch "$batch" \
      --prompt-len 512 --gen-len 128 --repeats 3 --json
  done
done
# the full-size model, built at bf16 on the GPU first: 87 GiB fit a 141 GB H200, not an H100
mem=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)")
if [ "$mem" -ge 100 ]; then
  for quant in bf16 int4; do
    "$PY" -m mixtral bench --device cuda --model mixtral-8x7b --quant "$quant" --prompt-len 512 \
      --gen-len 64 --repeats 2 --json
  done
fi
