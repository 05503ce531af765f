#!/usr/bin/env bash
# SQuAD-open end to end: prepare -> ICT -> fine-tuning from ICT alone -> REALM pre-training -> fine-tuning
# from REALM -> the retrieval comparison (BM25, MiniLM off the shelf, our models) into docs/RESULTS.md.
# Budget: 60 minutes on 2 quiet CPU cores; each stage prints its wall time.
#
#   bash scripts/squad_open.sh [dotted.key=value ...]      each step takes the overrides it reads (a key
#                                                          no step reads is refused)
#   CONFIG=configs/squad_open_gpu.yaml PYTHON=python3 bash scripts/squad_open.sh
#   RESULTS=path.md PLOT=path.png bash scripts/squad_open.sh   the comparison's outputs elsewhere
#
# The ICT-start fine-tuning runs before pre-training so that it reads the index ICT just published
# (fine-tuning re-embeds the corpus unless the current index is its doc encoder's).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/squad_open.yaml}
PY=${PYTHON:-.venv/bin/python}

source scripts/stage.sh  # stage NAME COMMAND...: runs it and prints its wall time

launch() { "$PY" launch.py --config "$CONFIG" --pipeline prepare,ict,finetune,pretrain,evaluate "$@"; }  # compare evaluates

stage prepare launch prepare "$@"
stage ict launch ict "$@"
stage "finetune from ICT" launch finetune finetune.init=ict finetune.name=qa_ict "$@"
stage pretrain launch pretrain "$@"
stage "finetune from REALM" launch finetune finetune.init=realm finetune.name=qa "$@"
stage compare "$PY" -m bench.retrieval_compare --config "$CONFIG" ${RESULTS:+--results "$RESULTS"} \
  ${PLOT:+--plot "$PLOT"} "$@"
