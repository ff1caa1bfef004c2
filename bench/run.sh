#!/usr/bin/env bash
# The benchmark, in one command from a fresh clone: bench/run.sh
#
# Builds the release binaries, starts the fake OpenAI Realtime server (loadgen fake-realtime),
# then for each N: a floor run (N calls straight to the fake) and a bridge run (N calls through
# a freshly started callbridge, whose CPU and memory are read from /proc). Prints the table and
# the targets, and writes the summary JSON (to RESULTS, below). Everything runs on 127.0.0.1
# and stops by itself (about 7 minutes with the defaults).
#
# Environment:
#   CALLS            the N to run, ascending (default "100 200 400 600 800")
#   SECONDS_PER_RUN  audio each call sends per run (default 20)
#   RAMP_SECONDS     calls start spread over this long (default 2)
#   CARGO_TARGET_DIR where cargo builds (default target)
#   RESULTS          where the summary JSON goes (default: the run's scratch directory, so the
#                    committed bench/results.json changes only when asked:
#                    RESULTS=bench/results.json bench/run.sh)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
calls_list=${CALLS:-100 200 400 600 800}
seconds=${SECONDS_PER_RUN:-20}
ramp=${RAMP_SECONDS:-2}
target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir=$root/$target_dir ;; esac
bin=$target_dir/release

for tool in cargo curl getconf; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh needs $tool" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/callbridge-bench.XXXXXX")
results=${RESULTS:-$work/results.json}
fake_pid=
server_pid=
cleanup() {
    for pid in $server_pid $fake_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every call holds three sockets on this machine (harness, server, fake) plus the bridge's
# second one: raise the descriptor limit as far as allowed.
max_calls=0
for n in $calls_list; do if ((n > max_calls)); then max_calls=$n; fi; done
needed=$((4 * max_calls + 256))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && (($(ulimit -n) < needed)); then
    echo "warning: ulimit -n is $(ulimit -n); $needed descriptors are needed for $max_calls calls" >&2
fi

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

echo "==> starting the fake Realtime server" >&2
"$bin/loadgen" fake-realtime --port 0 >"$work/fake.out" 2>"$work/fake.err" &
fake_pid=$!
wait_for grep -q '^listening on ' "$work/fake.out"
fake_address=$(sed -n 's/^listening on //p' "$work/fake.out")
realtime_url="ws://$fake_address/v1/realtime"

account_sid=AC$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
auth_token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
clk_tck=$(getconf CLK_TCK)

# A fresh server per N, so each run's memory growth starts from a clean process.
start_server() {
    local port=$1
    # Run from the work directory so a developer's .env is not picked up.
    (cd "$work" && exec env -i PATH="$PATH" \
        PORT="$port" \
        PUBLIC_BASE_URL="http://127.0.0.1:$port" \
        TWILIO_ACCOUNT_SID="$account_sid" \
        TWILIO_AUTH_TOKEN="$auth_token" \
        OPENAI_API_KEY=dummy \
        OPENAI_REALTIME_URL="$realtime_url" \
        MAX_CONCURRENT_CALLS=2000 \
        DATABASE_URL="sqlite://$work/bench.db?mode=rwc" \
        RUST_LOG=warn \
        "$bin/callbridge") >>"$work/server.log" 2>&1 &
    server_pid=$!
    wait_for curl -sf "http://127.0.0.1:$port/healthz"
}

stop_server() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=
}

# Share of both cores busy over one second, from /proc/stat: the harness and the server need
# the machine to themselves, so anything else running shows up in their numbers.
busy_percent() {
    local _ user nice system idle iowait irq softirq steal total1 idle1
    read -r _ user nice system idle iowait irq softirq steal _ </proc/stat
    total1=$((user + nice + system + idle + iowait + irq + softirq + steal))
    idle1=$((idle + iowait))
    sleep 1
    read -r _ user nice system idle iowait irq softirq steal _ </proc/stat
    total=$((user + nice + system + idle + iowait + irq + softirq + steal - total1))
    echo $((100 * (total - (idle + iowait - idle1)) / total))
}

runs=$work/runs
mkdir -p "$runs"
load_args=(--seconds "$seconds" --ramp-seconds "$ramp" --clk-tck "$clk_tck" --json)
for n in $calls_list; do
    busy=$(busy_percent)
    if ((busy > 10)); then
        echo "warning: the machine was ${busy}% busy before this run; expect noisy numbers" >&2
    fi
    echo "==> N=$n: floor" >&2
    "$bin/loadgen" floor --realtime "$realtime_url" --calls "$n" --pid "$fake_pid" \
        "${load_args[@]}" >"$runs/floor-$n.json"
    sleep 1

    echo "==> N=$n: bridge" >&2
    port=$(free_port)
    start_server "$port"
    "$bin/loadgen" run --server "http://127.0.0.1:$port" \
        --public-base-url "http://127.0.0.1:$port" \
        --auth-token "$auth_token" --account-sid "$account_sid" \
        --calls "$n" --pid "$server_pid" "${load_args[@]}" >"$runs/bridge-$n.json"
    stop_server
    sleep 1
done

echo >&2
"$bin/loadgen" report "$runs" --json-out "$results"
echo >&2
echo "per-run reports: $runs; server log: $work/server.log; summary: $results" >&2
