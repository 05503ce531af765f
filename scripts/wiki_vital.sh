#!/usr/bin/env bash
# Real Wikipedia end to end (configs/wiki_vital.yaml): prepare -> ICT -> fine-tuning from ICT alone -> REALM
# pre-training -> fine-tuning from REALM -> masked spans on held-out articles (REALM's, ICT's, BM25 and hybrid
# candidates for one reader) -> the hybrid fusion and BM25 weight fitted on nq_train (bench/fusion_weights.py,
# unless retrieval.fusion or retrieval.bm25_weight is given) -> the retrieval comparison on NQ-open dev and
# WebQuestions test (BM25, MiniLM off the shelf, our models, hybrid with the fitted setting), the tables into
# docs/RESULTS.md. Each stage prints its wall time.
#
#   bash scripts/wiki_vital.sh [dotted.key=value ...]     each step takes the overrides it reads (a key no step
#                                                         reads is refused)
#   RESULTS=path.md PLOT=path.png bash scripts/wiki_vital.sh   the tables and the plot elsewhere
#   DATA=dir bash scripts/wiki_vital.sh                   the question files' directory (default: the shared data)
#
# The ICT-start fine-tuning runs before pre-training so that it reads the index ICT just published.
# The comparison scores every question of both sets (the config's data.max_eval_examples caps held-out masked spans).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/wiki_vital.yaml}
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/wiki_vital}

source scripts/stage.sh  # stage NAME COMMAND...: runs it and prints its wall time

launch() { "$PY" launch.py --config "$CONFIG" --pipeline prepare,ict,finetune,pretrain,evaluate "$@"; }

stage prepare launch prepare "$@"
stage ict launch ict "$@"
stage "finetune from ICT" launch finetune finetune.init=ict finetune.name=qa_ict "$@"
stage pretrain launch pretrain "$@"
stage "finetune from REALM" launch finetune finetune.init=realm finetune.name=qa "$@"
stage "held-out masked spans" "$PY" -m bench.heldout_spans --config "$CONFIG" ${RESULTS:+--results "$RESULTS"} \
  --pipeline prepare,ict,finetune,pretrain,evaluate "$@"
FUSION=$(mktemp)
trap 'rm -f "$FUSION"' EXIT
stage "fit hybrid fusion on nq_train" "$PY" -m bench.fusion_weights --config "$CONFIG" ${RESULTS:+--results "$RESULTS"} \
  --models qa qa_ict --fit nq_train --write-overrides "$FUSION" --questions "nq_train=$DATA/nq_train.jsonl" \
  --questions "nq_dev=$DATA/nq_dev.jsonl" --questions "webquestions_test=$DATA/webquestions_test.jsonl" "$@"
case " $* " in  # a setting the user gives is theirs: the fit is reported, not applied
  *" retrieval.fusion="* | *" retrieval.bm25_weight="*) : > "$FUSION" ;;
  *) echo "hybrid rows use $(cat "$FUSION") (the best answer recall@5 on nq_train; put it in your config to serve it)" ;;
esac
# shellcheck disable=SC2046  # two key=value words
stage compare "$PY" -m bench.retrieval_compare --config "$CONFIG" ${RESULTS:+--results "$RESULTS"} \
  ${PLOT:+--plot "$PLOT"} --questions "nq_dev=$DATA/nq_dev.jsonl" \
  --questions "webquestions_test=$DATA/webquestions_test.jsonl" data.max_eval_examples=1000000 "$@" $(cat "$FUSION")
