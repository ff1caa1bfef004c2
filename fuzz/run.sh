#!/usr/bin/env bash
# Runs every fuzz target (or the ones named as arguments) for a bounded time each, and prints per
# target the inputs executed and the crashes found; exits non-zero if any target crashed (or
# could not run).
#
#   fuzz/run.sh                          # every target, 60 s each
#   SECONDS_PER_TARGET=300 fuzz/run.sh twilio_frame openai_event
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). Each target runs on a scratch corpus, fuzz/corpus/<target>
# (git-ignored, kept between runs so later runs start where earlier ones stopped), with the
# committed seeds, fuzz/seeds/<target>, read alongside it and never written. A run stops at its
# target's first crash; libFuzzer writes the input to fuzz/artifacts/<target>/. Once fixed, the
# input belongs in fuzz/seeds/<target>/ so tests/fuzz_seeds.rs keeps it fixed on stable.
#
# Not run by .ci/run: a useful run takes minutes per target.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${SECONDS_PER_TARGET:-60}
toolchain=${FUZZ_TOOLCHAIN:-nightly}

if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: needs cargo-fuzz on the $toolchain toolchain:" >&2
    echo "  rustup toolchain install $toolchain && cargo install cargo-fuzz" >&2
    exit 2
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# Built once up front, so a compile error is reported as such and not as a crash.
if ! cargo "+$toolchain" fuzz build >"$logs/build.log" 2>&1; then
    cat "$logs/build.log" >&2
    exit 2
fi

# How many inputs libFuzzer has saved for the target (crash-*, timeout-*, oom-*, leak-*).
artifacts_of() {
    if [[ -d "fuzz/artifacts/$1" ]]; then
        find "fuzz/artifacts/$1" -type f | wc -l
    else
        echo 0
    fi
}

failed=0
printf '%-18s %14s %8s  %s\n' target inputs crashes note
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    before=$(artifacts_of "$target")
    log="$logs/$target.log"
    status=0
    cargo "+$toolchain" fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    inputs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    crashes=$(($(artifacts_of "$target") - before))
    note=""
    if [[ $crashes -gt 0 ]]; then
        note=$(grep -m 1 -o "fuzz/artifacts/$target/[^ ]*" "$log" || true)
        failed=1
    elif [[ $status -ne 0 ]]; then
        note="exited $status: $(tail -n 1 "$log")"
        failed=1
    fi
    printf '%-18s %14s %8s  %s\n' "$target" "${inputs:-?}" "$crashes" "$note"
    if [[ $status -ne 0 ]]; then
        # The crash's report: the panic message and its input.
        grep -a -E "panicked at|^Error|SUMMARY|Test unit written" "$log" | head -n 20 >&2 || true
    fi
done
exit "$failed"
