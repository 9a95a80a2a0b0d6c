#!/usr/bin/env bash
# Evaluate one checkpoint of the default model's recipe (issue 17) as its model card reports it,
# into OUT: the passkey grid, perplexity vs context, routing, the induction probe, and the
# held-out sets in and out of distribution served in bf16 as shipped (scripts/eval_heldout.py ->
# OUT/heldout.json).
# scripts/train_default.sh runs it on the DPO model (into eval/) and on the final SFT model (into
# eval/final/), so that scripts/ship_default.py can ship whichever stage measures better with
# that stage's own figures.
#   scripts/eval_stage.sh [--dry-run] MODEL OUT   # --dry-run: a handful of cases per eval
# Settings (environment): PY, CORPUS (default data/corpus: its pretrain/val text is measured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
usage() { echo "usage: scripts/eval_stage.sh [--dry-run] MODEL OUT" >&2; exit 2; }

DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
[ $# = 2 ] || usage
case "$1" in -*) usage ;; esac
M=$1 D=$2
CORPUS="${CORPUS:-data/corpus}"
if [ ! -d "$M" ]; then echo "eval_stage.sh: no checkpoint folder $M" >&2; exit 2; fi
if [ ! -d "$CORPUS/pretrain/val" ]; then
  echo "eval_stage.sh: no $CORPUS/pretrain/val (set CORPUS to scripts/build_corpus.py's folder)" >&2
  exit 2
fi
if [ "$DRY" = 1 ]; then
  PASSKEY=(--lengths 128 --depths 2 --trials 1) MAX_LEN=128 ROUTE_TOKENS=400
  HELDOUT_N=(--n 2 --per-cell 1) PROBE=(--spans 2 --length 8)
else
  PASSKEY=(--lengths 128,256,384,500,768,1014 --depths 5 --trials 10) MAX_LEN=1024
  ROUTE_TOKENS=20000 HELDOUT_N=() PROBE=()
fi

mkdir -p "$D/domains"
# What the paper measures (the card reports these)
for pair in english_prose:austen scripture:bible_web python_code:python_stdlib \
            python_docs:python_docs french:libreoffice_help_fr german:libreoffice_help_de; do
  src="$CORPUS/pretrain/val/${pair#*:}.txt"
  if [ -e "$src" ]; then ln -sf "$(realpath "$src")" "$D/domains/${pair%%:*}.txt"; fi
done
"$PY" -m mixtral eval passkey --model "$M" --chat "${PASSKEY[@]}" --out "$D"
"$PY" -m mixtral eval perplexity --model "$M" --data "$CORPUS/pretrain/val" --max-len "$MAX_LEN" \
  --out "$D"
HTML=$(find "$D/domains" -name '*.txt' | sort | head -n 1)
"$PY" -m mixtral eval routing --model "$M" --data "$D/domains" --max-len "$MAX_LEN" \
  --max-tokens "$ROUTE_TOKENS" --html "$HTML" --out "$D"
# Can it copy at all (the induction probe: a span's repeat against its first showing)
"$PY" scripts/curriculum/induction.py "$M" --corpus "$CORPUS/pretrain/val" --json "$D/induction.json" \
  ${PROBE[@]+"${PROBE[@]}"}
# Issue 17's held-out sets, in and out of distribution, served in bf16 as shipped (the card's
# held-out table and the stage choice; scripts/ship_default.py reads it)
"$PY" scripts/eval_heldout.py --model "$M" --dtype bf16 --json "$D/heldout.json" \
  ${HELDOUT_N[@]+"${HELDOUT_N[@]}"}
echo "evaluated $M into $D"
