#!/usr/bin/env bash
# Builds the libFuzzer harness of the stream codec (Fuzz/FuzzStream.swift) and runs it.
#
#   Fuzz/run.sh [seconds]                  one process for a time (default 60 s)
#   Fuzz/run.sh --runs N [--workers W]     N inputs in all, split over W processes (default: one
#                                          per core); prints the inputs executed and the time taken
#   Fuzz/run.sh --up-to N [--workers W]    the same, but N is a ceiling: the time bound ending the
#                                          run first is not a failure (the slow tier's way)
#
# With --runs or --up-to, REMUSD_FUZZ_MAX_SECONDS (default 1800) bounds the run: a worker still
# short of its share then stops; with --runs the script then fails because the number was not
# reached, with --up-to it reports how many inputs ran. The workers share
# Fuzz/corpus-work/ (each reloads what the others found); their logs are .build-fuzz/worker-*.log.
#
# Build output goes to .build-fuzz/, new corpus entries to Fuzz/corpus-work/, crashes to
# Fuzz/artifacts/ (all git-ignored); Fuzz/corpus/ is the committed seed corpus. Exits non-zero
# when libFuzzer finds a crash, a leak, a timeout or an allocation over the limit (in any worker).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60 runs="" workers="$(nproc)" ceiling=0
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --up-to) runs="$2" ceiling=1; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        [0-9]*) seconds="$1"; shift ;;
        *) echo "usage: Fuzz/run.sh [seconds] | --runs N [--workers W] | --up-to N [--workers W]" >&2; exit 2 ;;
    esac
done

swiftc_bin="$(command -v swiftc)"
clang_bin="$(dirname "$swiftc_bin")/clang"
out=.build-fuzz
mkdir -p "$out/modules" Fuzz/artifacts Fuzz/corpus-work

cat > "$out/modules/module.modulemap" <<MAP
module CCRC32C {
    header "$PWD/Sources/CCRC32C/include/ccrc32c.h"
    export *
}
MAP

echo "building $out/fuzz-stream"
"$clang_bin" -O2 -fsanitize=fuzzer-no-link,address -c Sources/CCRC32C/crc32c.c -I Sources/CCRC32C/include -o "$out/crc32c.o"
# The stream codec and the backend contracts it uses; the engine is not needed. Whole-module
# optimisation lets the optimiser see across the codec's files: it halves the CPU time per input.
"$swiftc_bin" -sanitize=fuzzer,address -parse-as-library -O -wmo -D REMUS_FUZZING -module-name RemusFuzz \
    -I "$out/modules" \
    Sources/RemusCore/Stream/*.swift Sources/RemusCore/Backend/*.swift Fuzz/FuzzStream.swift \
    "$out/crc32c.o" -o "$out/fuzz-stream" 2> >(grep -v "Cannot export local symbol" >&2)

# Swift's own crash backtracer would read the stack under AddressSanitizer; libFuzzer reports instead.
export SWIFT_BACKTRACE=enable=no
options=(-max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=64 -timeout=10 -print_final_stats=1
         -artifact_prefix=Fuzz/artifacts/)

if [ -z "$runs" ]; then
    echo "fuzzing for ${seconds}s"
    exec "$out/fuzz-stream" Fuzz/corpus-work Fuzz/corpus -max_total_time="$seconds" "${options[@]}"
fi

bound="${REMUSD_FUZZ_MAX_SECONDS:-1800}"
share=$(( (runs + workers - 1) / workers ))
echo "fuzzing $runs inputs: $workers workers of $share each (at most ${bound}s)"
started=$(date +%s)
pids=()
# Stopped from outside (scripts/test.sh ends it when a run it loads fails): the workers go too.
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT
trap 'exit 143' TERM INT
for worker in $(seq 1 "$workers"); do
    "$out/fuzz-stream" Fuzz/corpus-work Fuzz/corpus -runs="$share" -max_total_time="$bound" -reload=1 \
        "${options[@]}" > "$out/worker-$worker.log" 2>&1 &
    pids+=("$!")
done

# The first worker to fail ends the others: its reproducer is in Fuzz/artifacts/.
failed=0 running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
    status=0 ended=""
    wait -n -p ended "${running[@]}" || status=$?
    [ -n "$ended" ] || break
    running=($(printf '%s\n' "${running[@]}" | grep -vx "$ended" || true))
    if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
        failed=$status
        for pid in "${running[@]}"; do kill "$pid" 2>/dev/null || true; done
    fi
done
elapsed=$(( $(date +%s) - started ))

total=0
for worker in $(seq 1 "$workers"); do
    log="$out/worker-$worker.log"
    executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    total=$(( total + ${executed:-0} ))
    echo "worker $worker: $(grep -E "^#[0-9]+" "$log" | tail -1)"
    if grep -qE "^==[0-9]+==|^INFO: a leak|ERROR: libFuzzer|SUMMARY: " "$log"; then
        grep -E -A 30 "^==[0-9]+==|ERROR: libFuzzer" "$log" | head -60
        grep -E "artifact_prefix|Test unit written" "$log" || true
    fi
done
echo "fuzzed $total inputs in ${elapsed}s ($(( total / (elapsed > 0 ? elapsed : 1) )) inputs/s)"
if [ "$failed" != 0 ]; then
    echo "a worker failed (exit $failed); reproducers: $(ls Fuzz/artifacts/ | tr '\n' ' ')"
    exit 1
fi
if [ "$total" -lt "$runs" ] && [ "$ceiling" = 1 ]; then
    echo "the ${bound}s bound ended the run after $total of up to $runs inputs; no findings"
elif [ "$total" -lt "$runs" ]; then
    echo "FAILED: $total of $runs inputs in the ${bound}s bound (REMUSD_FUZZ_MAX_SECONDS)"
    exit 1
fi
