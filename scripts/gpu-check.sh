#!/usr/bin/env bash
# The cuda backend's checks on a machine with an NVIDIA GPU, in one run of a few minutes.
#
#   scripts/gpu-check.sh build       here, with Rust: builds what travels into gpu-check/
#                                    (stripped, within the device tool's 64 MiB)
#   scripts/gpu-check.sh run [OUT]   there, from the repository root, no Rust needed:
#                                    runs everything and writes the results to OUT
#                                    (default $OUT, else gpu-check/out)
#
# With the device tool (which brings back at most 8 files): build here, then run
#   run(command="GPU_CHECK_PACK=$OUT/gpu-check.tgz scripts/gpu-check.sh run /tmp/gpu-check",
#       carry=["gpu-check"], timeout_s=590)
# and unpack gpu-check.tgz (packed again after every step, so a run cut short keeps what
# it did): machine.txt, cuda-tests.txt, device-tests.txt, bench-gpu.json, and with
# /dev/kvm bench-accel-{cpu,cuda}.json and bench-migrate-*.json; summary.txt says what
# ran, what passed and what was skipped. The steps' limits add up to under 10 minutes.
# `run` exits 1 if any step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

build() {
    set -e
    echo "== building the ferry binary and the accelerator's test binaries (release)"
    cargo build --release --locked --bin ferry
    local tests
    tests=$(cargo test --release --locked -p ferry-accel --no-run --message-format=json \
        | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda", "device"):
        print(m["target"]["name"], m["executable"])')
    rm -rf gpu-check && mkdir -p gpu-check
    cp target/release/ferry gpu-check/ferry
    while read -r name exe; do cp "$exe" "gpu-check/$name-tests"; done <<<"$tests"
    strip gpu-check/*
    ls -l gpu-check
    local total
    total=$(du -cb gpu-check/* | tail -1 | cut -f1)
    echo "== gpu-check/ holds $((total >> 20)) MiB (the device tool carries at most 64 MiB)"
    [ "$total" -lt $((64 << 20)) ] || { echo "gpu-check: too large to carry" >&2; exit 1; }
    [ -x gpu-check/cuda-tests ] && [ -x gpu-check/device-tests ] || { echo "gpu-check: test binaries missing" >&2; exit 1; }
}

run() {
    local out="${1:-${OUT:-gpu-check/out}}"
    mkdir -p "$out"
    local summary="$out/summary.txt"
    : >"$summary"
    local failed=0
    say() { echo "$*" | tee -a "$summary"; }
    # A step: its name, the seconds it may take, the file of its output, the command.
    step() {
        local name=$1 limit=$2 file=$3; shift 3
        local started=$SECONDS
        timeout "$limit" "$@" >"$out/$file" 2>"$out/$file.stderr"
        local rc=$?
        say "$name: exit $rc after $((SECONDS - started)) s (output: $file)"
        [ "$rc" = 0 ] || failed=$((failed + 1))
        pack
    }
    # Packed beside the pack and renamed over it: a run killed while packing keeps the
    # last whole pack (and a pack inside OUT is not packed into itself).
    pack() {
        [ -n "${GPU_CHECK_PACK:-}" ] || return 0
        local name
        name=$(basename "$GPU_CHECK_PACK")
        # Status 1: a file changed while read (the folder, when the pack is inside it).
        tar czf "$GPU_CHECK_PACK.part" --warning=no-file-changed \
            --exclude="./$name" --exclude="./$name.part" -C "$out" .
        [ $? -le 1 ] && mv "$GPU_CHECK_PACK.part" "$GPU_CHECK_PACK"
    }
    [ -x gpu-check/ferry ] || { echo "gpu-check: run 'scripts/gpu-check.sh build' first (and carry gpu-check/)" >&2; exit 2; }
    { date -u; uname -a; nvidia-smi 2>&1; ls -l /dev/kvm 2>&1; nproc; free -g; } >"$out/machine.txt"
    # The CUDA toolkit's NVRTC and cuBLAS, and the driver, are loaded at run time by the
    # names libnvrtc.so, libcublas.so, libcuda.so.1 (or .so.12): a toolkit that ships only
    # versioned files (libnvrtc.so.13) gets unversioned links in a folder of our own.
    local links
    links=$(mktemp -d)
    for lib in nvrtc cublas cublasLt; do
        local found
        found=$( { ls /usr/local/cuda/lib64/lib$lib.so* /usr/local/cuda/targets/x86_64-linux/lib/lib$lib.so* \
            2>/dev/null; ldconfig -p 2>/dev/null | awk -v l="lib$lib.so" '$1 ~ "^"l {print $NF}'; } \
            | grep -v -e alt -e builtins | sort -V | tail -1)
        [ -n "$found" ] && ln -sf "$found" "$links/lib$lib.so"
    done
    LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$dir" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
    done
    export LD_LIBRARY_PATH
    ls -l "$links" >>"$out/machine.txt" 2>&1
    # A test that cannot find the GPU or NVRTC fails here instead of skipping.
    export FERRY_REQUIRE_GPU=1 FERRY_REQUIRE_NVRTC=1
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        export FERRY_REQUIRE_KVM=1
    fi
    say "== gpu-check on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    step "kernels compiled by NVRTC and compared with the cpu backend on the GPU" 45 cuda-tests.txt \
        gpu-check/cuda-tests --test-threads=1 --nocapture
    step "device tests (hostile guests, dirty tracking, replay) on every backend" 45 device-tests.txt \
        gpu-check/device-tests --test-threads=2
    step "bench gpu (GEMM vs cuBLAS, chunk reads busy vs idle, writes)" 60 bench-gpu.json \
        gpu-check/ferry bench gpu --json
    # The same with no launch window: what a flood of small kernels does to reads then.
    step "bench gpu, launch window unbounded" 40 bench-gpu-unbounded.json \
        env FERRY_CUDA_LAUNCH_WINDOW=0 gpu-check/ferry bench gpu --json
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        step "bench accel on the cpu backend" 40 bench-accel-cpu.json gpu-check/ferry bench accel --json
        step "bench accel on the cuda backend" 40 bench-accel-cuda.json \
            gpu-check/ferry bench accel --backend cuda --json
        # A decoding VM's migration with the driver's launch window and without it: the
        # window keeps its flood of small kernels from holding up the migration's copies.
        step "bench migrate at 256 MiB, launch window ${FERRY_CUDA_LAUNCH_WINDOW:-default}" 50 \
            bench-migrate-window.json gpu-check/ferry bench migrate --backend cuda \
            --accel-sizes 256M --workloads llm-decode --repeats 1 --json
        step "bench migrate at 256 MiB, launch window unbounded" 50 bench-migrate-unbounded.json \
            env FERRY_CUDA_LAUNCH_WINDOW=0 gpu-check/ferry bench migrate --backend cuda \
            --accel-sizes 256M --workloads llm-decode --repeats 1 --json
        # Live vs stop-and-copy; fewer migrations per figure as device memory grows, so
        # that 32 GiB (about 20 GiB of it written) fits the run.
        step "bench migrate on the cuda backend at 1 GiB" 80 bench-migrate-1g.json \
            gpu-check/ferry bench migrate --backend cuda --accel-sizes 1G \
            --workloads llm-decode,mlp-train --repeats 3 --json
        step "bench migrate on the cuda backend at 8 GiB" 60 bench-migrate-8g.json \
            gpu-check/ferry bench migrate --backend cuda --accel-sizes 8G \
            --workloads llm-decode,mlp-train --repeats 1 --json
        step "bench migrate on the cuda backend at 32 GiB" 60 bench-migrate-32g.json \
            gpu-check/ferry bench migrate --backend cuda --accel-sizes 32G \
            --workloads llm-decode --repeats 1 --json
    else
        say "SKIPPED the VM-level benches (mlp-train, llm-decode, migration at 1/8/32 GiB): /dev/kvm is not usable here"
    fi
    rm -rf "$links"
    say "== done; results in $out; $failed step(s) failed"
    pack
    [ "$failed" = 0 ]
}

case "${1:-}" in
    build) build ;;
    run) shift; run "$@" ;;
    *) echo "usage: scripts/gpu-check.sh build | run [OUT]" >&2; exit 2 ;;
esac
