#!/usr/bin/env bash
# Builds the libFuzzer harness of the stream codec (Fuzz/FuzzStream.swift) and runs it.
#
#   Fuzz/run.sh [seconds]     (default 60)
#
# Build output goes to .build-fuzz/, new corpus entries to Fuzz/corpus-work/, crashes to
# Fuzz/artifacts/ (all git-ignored); Fuzz/corpus/ is the committed seed corpus. Exits non-zero
# when libFuzzer finds a crash, a leak, a timeout or an allocation over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
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
# The stream codec and the backend contracts it uses; the engine is not needed.
"$swiftc_bin" -sanitize=fuzzer,address -parse-as-library -O -D REMUS_FUZZING -module-name RemusFuzz \
    -I "$out/modules" \
    Sources/RemusCore/Stream/*.swift Sources/RemusCore/Backend/*.swift Fuzz/FuzzStream.swift \
    "$out/crc32c.o" -o "$out/fuzz-stream"

echo "fuzzing for ${seconds}s"
# Swift's own crash backtracer would read the stack under AddressSanitizer; libFuzzer reports instead.
export SWIFT_BACKTRACE=enable=no
"$out/fuzz-stream" Fuzz/corpus-work Fuzz/corpus \
    -max_total_time="$seconds" \
    -max_len=65536 \
    -rss_limit_mb=2048 \
    -malloc_limit_mb=64 \
    -timeout=10 \
    -print_final_stats=1 \
    -artifact_prefix=Fuzz/artifacts/
