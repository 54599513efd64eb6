#!/usr/bin/env bash
# Runs every fuzzer for SECONDS (default 600) of wall-clock time, two at a time, with the
# kept inputs as seeds; logs and new corpus entries stay under fuzz/ (ignored by git).
# Exits 1 if any fuzzer found a crash or could not run (logs/summary says which).
set -euo pipefail
SECONDS_EACH=${1:-600}
cd "$(dirname "$0")"
cargo +nightly --version >/dev/null 2>&1 \
    || { echo "run-all: needs a nightly toolchain: rustup toolchain install nightly" >&2; exit 1; }
cargo +nightly fuzz --version >/dev/null 2>&1 \
    || { echo "run-all: needs cargo-fuzz: cargo install cargo-fuzz" >&2; exit 1; }
mkdir -p corpus logs
run() {
    mkdir -p "corpus/$1"
    local rc=0
    cargo +nightly fuzz run "$1" "corpus/$1" "regressions/$1" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 > "logs/$1.log" 2>&1 \
        || rc=$?
    echo "$1: exit $rc" >> logs/summary
}
: > logs/summary
run wire & run kernel_decode & wait
run snapshot & run gguf & wait
run api_bodies & run channel & wait
cat logs/summary
! grep -qv ': exit 0$' logs/summary
