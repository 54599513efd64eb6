#!/bin/sh
# Runs every fuzzer for SECONDS (default 600) of CPU time, two at a time, with the kept
# inputs as seeds; logs and new corpus entries stay under fuzz/ (ignored by git).
set -u
SECONDS_EACH=${1:-600}
cd "$(dirname "$0")"
mkdir -p corpus logs
run() {
    mkdir -p "corpus/$1"
    TMPDIR=/dev/shm cargo +nightly fuzz run "$1" "corpus/$1" "regressions/$1" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 > "logs/$1.log" 2>&1
    echo "$1: exit $?" >> logs/summary
}
: > logs/summary
run wire & run kernel_decode & wait
run snapshot & run gguf & wait
run api_bodies & run channel & wait
