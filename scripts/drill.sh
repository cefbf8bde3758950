#!/usr/bin/env bash
# The README's first command: set up, build, and run a failover drill on the simulated guest.
# Extra arguments go to 'remusd drill' (e.g. --failovers 50 --seed 7).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release
exec .build/release/remusd drill "$@"
