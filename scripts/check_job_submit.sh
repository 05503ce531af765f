#!/usr/bin/env bash
# Scripted check of the cluster recipe in README ("On a cluster"): start a Ray head on 127.0.0.1
# (token auth on, dashboard on 127.0.0.1 only), `ray job submit --working-dir .` a short
# pre-training job that joins it with cluster.address=auto, wait for it, stop the head.
# Usage: bash scripts/check_job_submit.sh [RUN_DIR]   (RUN_DIR gets a tiny random-BERT run)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=$(realpath -m "${1:-$(mktemp -d)/run}")
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Free ports, so that this head never collides with another Ray on the machine (a local Ray holds
# the default agent port 52365 and client port 10001).
DASH_PORT=${DASH_PORT:-$(free_port)}
GCS_PORT=${GCS_PORT:-$(free_port)}
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=token HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# shellcheck disable=SC2207  # one override per line, none with spaces
SMALL=($(python -c 'from trainer.config import SMOKE_RUN; print("\n".join(SMOKE_RUN))') threads=1)
STAGES=(--pipeline prepare,ict,pretrain,evaluate)  # SMOKE_RUN is for a whole run: each command takes its keys
python launch.py prepare "${STAGES[@]}" run_dir="$RUN_DIR" "${SMALL[@]}" >/dev/null
python launch.py ict "${STAGES[@]}" run_dir="$RUN_DIR" "${SMALL[@]}" >/dev/null

# Our own temp dir and GCS port: this head's processes carry one of them on their command line,
# or (agents, which rename themselves) its raylet's PID in their environment. The clean-up stops
# this head only (`ray stop` would stop every Ray on the machine).
RAY_TMP=$(mktemp -d /tmp/rayjob.XXXXXX)
OURS="$RAY_TMP|--address=[^ ]*:$GCS_PORT( |$)"
RAYLET_PID=""
head_pids() {
  pgrep -f -- "$OURS" || true
  [ -n "$RAYLET_PID" ] && for p in /proc/[0-9]*; do
    grep -qszx "RAY_RAYLET_PID=$RAYLET_PID" "$p/environ" 2>/dev/null && echo "${p#/proc/}"
  done
  return 0
}
stop_head() {
  local pids; pids=$(head_pids | sort -u)
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null; sleep 2
  pids=$(head_pids | sort -u); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  rm -rf "$RAY_TMP"
}
trap stop_head EXIT
ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --include-dashboard true --temp-dir "$RAY_TMP" \
  --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus 4 --disable-usage-stats >/dev/null
RAYLET_PID=$(pgrep -f -- "raylet/raylet .*$RAY_TMP" | head -1)
ADDRESS="http://127.0.0.1:$DASH_PORT"
JOB_ID="realm-check-$$"
# The head's job agent comes up a few seconds after `ray start`: retry only that refusal.
for attempt in $(seq 30); do
  if out=$(ray job submit --address "$ADDRESS" --submission-id "$JOB_ID" --no-wait --working-dir . \
      --runtime-env-json "$(cat configs/cluster_runtime_env.json)" \
      -- python launch.py pretrain "${STAGES[@]}" run_dir="$RUN_DIR" cluster.address=auto "${SMALL[@]}" \
         pretrain.steps=6 pretrain.batch_size=4 refresh.every_steps=2 refresh.max_staleness=2 \
         pretrain.log_every=1 2>&1); then break; fi
  grep -q "No available agent" <<<"$out" || { echo "$out" >&2; exit 1; }
  [ "$attempt" = 30 ] && { echo "job agent never came up" >&2; exit 1; }
  sleep 2
done
ray job logs --address "$ADDRESS" --follow "$JOB_ID" | grep -v "Loading weights\|Writing model" || true
status=$(ray job status --address "$ADDRESS" "$JOB_ID" 2>&1)
grep -qi "succeeded" <<<"$status" || { echo "$status" >&2; exit 1; }
python - "$RUN_DIR" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/pretrain_summary.json"))
assert s["steps"] == 6 and s["refreshes"] >= 2, s
print(f"job submit check: OK ({s['steps']} steps, {s['refreshes']} refreshes, {s['wall_seconds']:.1f} s)")
PY
