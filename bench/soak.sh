#!/usr/bin/env bash
# The soak, in one command from a fresh clone: bench/soak.sh
#
# Builds the release binaries, starts callbridge (SQLite in a scratch directory, a short
# SESSION_ROLLOVER_SECS, one agent per lane from `loadgen soak-agents`), then runs
# `loadgen soak`: thousands of short calls, each ending with Twilio's stop, a Twilio socket
# dropped without stop (FIN or reset), an OpenAI socket reset mid-call, new sessions refused
# (the apology path), session_expired, a rollover, or a Twilio drop while callbridge is still
# dialling a new session. The fake OpenAI Realtime and Twilio REST servers run inside loadgen.
# Afterwards it checks every OpenAI socket, call slot, socket, record and the memory, prints
# the summary, and exits 0 only if every check passed. Everything runs on 127.0.0.1; the
# processes and the scratch directory are removed at the end (about 6 minutes with the
# defaults, plus the build).
#
# Environment:
#   SOAK_CALLS          calls in the soak, after the warm-up (default 6000)
#   SOAK_WARMUP_CALLS   calls before the memory baseline is taken (default 1000)
#   SOAK_CONCURRENCY    calls up at once (default 64)
#   SOAK_CHECKPOINT_CALLS  after every this many calls the soak lets callbridge go quiet and
#                       reads its memory, for the trend (default 1000)
#   SOAK_ROLLOVER_SECS  the server's SESSION_ROLLOVER_SECS, at least 3 (default 3)
#   SOAK_MIX            weights, e.g. "stop=30,twilio-drop=20,openai-drop=14,refused=8,
#                       expired=12,rollover=10,drop-mid-reconnect=6" (the default)
#   SOAK_SEED           the same seed plays the same calls (default 1)
#   SOAK_JSON           where the JSON report goes (default $CARGO_TARGET_DIR/soak-results.json,
#                       which git ignores)
#   CARGO_TARGET_DIR    where cargo builds (default target)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
calls=${SOAK_CALLS:-6000}
warmup=${SOAK_WARMUP_CALLS:-1000}
concurrency=${SOAK_CONCURRENCY:-64}
checkpoint=${SOAK_CHECKPOINT_CALLS:-1000}
rollover=${SOAK_ROLLOVER_SECS:-3}
seed=${SOAK_SEED:-1}
target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir=$root/$target_dir ;; esac
json_out=${SOAK_JSON:-$target_dir/soak-results.json}
bin=$target_dir/release
# Twice as many lanes (agents) as calls at once, so a lane is reused only long after its call.
lanes=$((2 * concurrency + 32))

for tool in cargo curl getconf od; do
    command -v "$tool" >/dev/null || { echo "bench/soak.sh needs $tool" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/callbridge-soak.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Each call holds a handful of sockets across the three processes' worth of peers.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "==> cargo build --release -p callbridge -p callbridge-loadgen" >&2
cargo build --release --locked -p callbridge -p callbridge-loadgen >&2

# A free TCP port on 127.0.0.1: nothing answers a connection to it.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Waits until a command succeeds, for at most 10 s.
wait_for() {
    local tries=100
    until "$@" >/dev/null 2>&1; do
        ((--tries > 0)) || { echo "timed out waiting for: $*" >&2; return 1; }
        sleep 0.1
    done
}

port=$(free_port)
realtime_port=$(free_port)
twilio_port=$(free_port)
while [ "$realtime_port" = "$port" ]; do realtime_port=$(free_port); done
while [ "$twilio_port" = "$port" ] || [ "$twilio_port" = "$realtime_port" ]; do
    twilio_port=$(free_port)
done
account_sid=AC$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
auth_token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
api_token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
"$bin/loadgen" soak-agents --lanes "$lanes" >"$work/agents.toml"

echo "==> starting callbridge on port $port" >&2
# Run from the scratch directory so a developer's .env is not picked up. The fakes are not up
# yet: callbridge reaches them only once calls arrive, and loadgen starts them first.
(cd "$work" && exec env -i PATH="$PATH" \
    PORT="$port" \
    PUBLIC_BASE_URL="http://127.0.0.1:$port" \
    TWILIO_ACCOUNT_SID="$account_sid" \
    TWILIO_AUTH_TOKEN="$auth_token" \
    TWILIO_API_BASE_URL="http://127.0.0.1:$twilio_port" \
    OPENAI_API_KEY=dummy \
    OPENAI_REALTIME_URL="ws://127.0.0.1:$realtime_port/v1/realtime" \
    CALLBRIDGE_API_TOKEN="$api_token" \
    AGENTS_FILE="$work/agents.toml" \
    SESSION_ROLLOVER_SECS="$rollover" \
    MAX_CONCURRENT_CALLS=1000 \
    DRAIN_TIMEOUT_SECS=5 \
    DATABASE_URL="sqlite://$work/soak.db?mode=rwc" \
    RUST_LOG=warn \
    "$bin/callbridge") >"$work/server.log" 2>&1 &
server_pid=$!
wait_for curl -sf "http://127.0.0.1:$port/readyz"

mix_args=()
if [ -n "${SOAK_MIX:-}" ]; then mix_args=(--mix "$SOAK_MIX"); fi
status=0
"$bin/loadgen" soak --server "http://127.0.0.1:$port" \
    --public-base-url "http://127.0.0.1:$port" \
    --auth-token "$auth_token" --account-sid "$account_sid" --api-token "$api_token" \
    --pid "$server_pid" --realtime-port "$realtime_port" --twilio-port "$twilio_port" \
    --calls "$calls" --warmup-calls "$warmup" --concurrency "$concurrency" --lanes "$lanes" \
    --checkpoint-calls "$checkpoint" \
    --rollover-secs "$rollover" --seed "$seed" --clk-tck "$(getconf CLK_TCK)" \
    "${mix_args[@]}" --json-out "$json_out" || status=$?

kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=
if ((status != 0)); then
    cp "$work/server.log" "$target_dir/soak-server.log"
    echo "soak FAILED (exit $status); server log: $target_dir/soak-server.log" >&2
fi
echo "JSON report: $json_out" >&2
exit "$status"
