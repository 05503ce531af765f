#!/usr/bin/env bash
# Scripted check of the cluster recipe in README ("On a cluster"): start a Ray head on 127.0.0.1
# (token auth on, dashboard on 127.0.0.1 only), `ray job submit --working-dir .` a short
# pre-training job that joins it with cluster.address=auto, wait for it, stop the head.
# Usage: bash scripts/check_job_submit.sh [RUN_DIR]   (RUN_DIR gets a tiny random-BERT run)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=$(realpath -m "${1:-$(mktemp -d)/run}")
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=token HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# shellcheck disable=SC2207  # one override per line, none with spaces
SMALL=($(python -c 'from trainer.config import SMOKE_RUN; print("\n".join(SMOKE_RUN))') threads=1)
STAGES=(--pipeline prepare,ict,pretrain,evaluate)  # SMOKE_RUN is for a whole run: each command takes its keys
python launch.py prepare "${STAGES[@]}" run_dir="$RUN_DIR" "${SMALL[@]}" >/dev/null
python launch.py ict "${STAGES[@]}" run_dir="$RUN_DIR" "${SMALL[@]}" >/dev/null

# Our own temp dir and GCS port: this head's processes carry one of them on their command line;
# the rest (agents, which rename themselves, workers, the job's driver) descend from those. The
# clean-up stops this head only (`ray stop` would stop every Ray on the machine).
RAY_TMP="" OURS=""
head_pids() {
  [ -n "$OURS" ] || return 0
  ps -e -o pid=,ppid= | awk -v roots="$(pgrep -f -- "$OURS" | tr '\n' ' ')" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) ours[r[i]] = 1 }
    { parent[$1] = $2 }
    END { do { grown = 0; for (p in parent) if (!(p in ours) && (parent[p] in ours)) { ours[p] = 1; grown = 1 } }
          while (grown); for (p in ours) print p }'
}
stop_head() {
  local pids; pids=$(head_pids)  # while the raylet lives, so that its children are still its own
  [ -n "$pids" ] && { kill -TERM $pids 2>/dev/null || true; }; sleep 2
  pids=$(printf '%s\n' $pids $(head_pids) | sort -u)
  [ -n "$pids" ] && { kill -KILL $pids 2>/dev/null || true; }
  [ -n "$RAY_TMP" ] && rm -rf "$RAY_TMP"
  RAY_TMP="" OURS=""
}
trap stop_head EXIT
# Ports outside the kernel's ephemeral range (cluster/ports.py says why), so that none of another
# Ray's ports (a local Ray holds the default agent port 52365 and client port 10001) and none of
# this head's own outgoing connections can take one before the head binds it.
start_head() {
  local agent_port client_port
  read -r DASH_PORT GCS_PORT agent_port client_port <<<"$(python -m cluster.ports 4)"
  RAY_TMP=$(mktemp -d /tmp/rayjob.XXXXXX)
  OURS="$RAY_TMP|--address=[^ ]*:$GCS_PORT( |$)"
  ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --include-dashboard true --temp-dir "$RAY_TMP" \
    --dashboard-agent-listen-port "$agent_port" --ray-client-server-port "$client_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus 4 --disable-usage-stats >/dev/null
  ADDRESS="http://127.0.0.1:$DASH_PORT"
}
agent_log() { cat "$RAY_TMP"/session_latest/logs/dashboard_agent.log 2>/dev/null || true; }
JOB_ID="realm-check-$$"
submit() {
  ray job submit --address "$ADDRESS" --submission-id "$JOB_ID" --no-wait --working-dir . \
    --runtime-env-json "$(cat configs/cluster_runtime_env.json)" \
    -- python launch.py pretrain "${STAGES[@]}" run_dir="$RUN_DIR" cluster.address=auto "${SMALL[@]}" \
       pretrain.steps=6 pretrain.batch_size=4 refresh.every_steps=2 refresh.max_staleness=2 \
       pretrain.log_every=1 2>&1
}
# The head's job agent registers a few seconds after `ray start` (longer on a loaded machine): retry
# only that refusal, for AGENT_WAIT_S seconds. An agent that could not bind its port never registers:
# say so and start a fresh head, at most twice.
AGENT_WAIT_S=${AGENT_WAIT_S:-240}
for head in 1 2 3; do
  start_head
  deadline=$((SECONDS + AGENT_WAIT_S))
  while ! out=$(submit); do
    grep -q "No available agent" <<<"$out" || { echo "$out" >&2; exit 1; }
    bind_error=$(agent_log | grep "failed to bind" | tail -1 || true)
    if [ -n "$bind_error" ]; then
      echo "head $head: $bind_error" >&2
      [ "$head" = 3 ] && exit 1
      stop_head; continue 2
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "job agent never came up in ${AGENT_WAIT_S} s; the end of its log:" >&2
      agent_log | tail -20 >&2
      exit 1
    fi
    sleep 2
  done
  break
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
