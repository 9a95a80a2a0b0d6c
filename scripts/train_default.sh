#!/usr/bin/env bash
# Build the default model from scratch: data, pretraining, SFT, DPO, evaluation.
# About 2 hours on 2 CPU cores; every stage resumes where it stopped if interrupted.
#   scripts/train_default.sh            # then: scripts/ship_default.py to package the result
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2  # 2x faster steps (Debian libjemalloc2)
if [ -e "$JEMALLOC" ]; then export LD_PRELOAD="$JEMALLOC"; fi
[ -s data/corpus/manifest.json ] || "$PY" scripts/build_corpus.py data/corpus
[ -s data/instruct/sft.jsonl ] || "$PY" scripts/build_instruct_data.py data/instruct --corpus data/corpus --n 30000
"$PY" -m mixtral train pretrain --config recipes/default/pretrain.yaml
"$PY" -m mixtral train sft --config recipes/default/sft.yaml
"$PY" -m mixtral train dpo --config recipes/default/dpo.yaml
mkdir -p runs/default/eval
"$PY" scripts/eval_default.py runs/default/dpo/step-000200 --compare runs/default/sft/step-000800 \
  --json runs/default/eval/dpo.json
"$PY" scripts/eval_default.py runs/default/sft/step-000800 --json runs/default/eval/sft.json
