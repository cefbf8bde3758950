#!/usr/bin/env bash
# Builds the stream codec benchmark in release mode and runs it.
#
#   Benchmarks/run.sh [repetitions]     (default 31)
#
# Prints Markdown tables: throughput (median and p10–p90 over the repetitions) as a ratio against
# memcpy of the same bytes measured in the same run, and allocations per page counted by a malloc
# interposer. Build output goes to .build-bench/ (git-ignored). Run it on an otherwise idle machine;
# on a shared one the spread (p10–p90) shows the noise.
set -euo pipefail
cd "$(dirname "$0")"
swift build -c release --scratch-path ../.build-bench --product StreamCodecBenchmark >&2
../.build-bench/release/StreamCodecBenchmark "${1:-31}"
swift build -c release --scratch-path ../.build-bench --product CapturePathBenchmark >&2
../.build-bench/release/CapturePathBenchmark
