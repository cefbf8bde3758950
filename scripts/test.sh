#!/usr/bin/env bash
# The README's test command (and CI's): unit and property tests, 200+ verified failovers,
# a bounded fuzz run, the kernel testbed for the plug qdisc, and the Xen testbed (remusd and
# xl remus protecting real Xen PVH domains on Debian 12's current Xen 4.17, on one host and
# across two; REMUSD_XEN_TESTBED_GUESTS picks the guest kinds, Tests/XenTestbed/README.md).
# REMUSD_SKIP_TESTBED=1 skips every QEMU testbed; REMUSD_SKIP_XEN_TESTBED=1 only the Xen ones;
# REMUSD_FUZZ_SECONDS sets the decoder fuzz time (default 60), REMUSD_NET_FUZZ_SECONDS the network
# fuzzer's (default 60; the unit suite runs it for 8 s) and REMUSD_NET_FUZZ_SEED re-runs one seed.
# The slow tier (REMUSD_SLOW=1; on by default under CI=true, REMUSD_SLOW=0 leaves it out): the
# unit suite three times back to back under load (a flake is a bug: none may show), the load
# being the decoder fuzzer's long run for REMUSD_FUZZ_RUNS inputs (default 10^7, one worker per
# core; stress-ng --cpu 2 once it has ended), which then runs to its end instead of the timed run
# and fails when the number is not reached within REMUSD_FUZZ_MAX_SECONDS (3600 here); then the
# replica read/discard race under ThreadSanitizer. Measured: about 4,100 fuzzer inputs per
# CPU-second per worker, some 20 minutes of 2 idle cores (Docs/stream-format.md §12).
# REMUSD_XEN_420=1 adds the Xen testbed's Debian 13 variant (Xen 4.20, a trixie dom0). It is not in
# the default run or CI's yet: it has not passed since the testbed moved to guest kinds
# (Tests/XenTestbed/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release tests
[ -x /opt/swift/usr/bin/swift ] && export PATH="/opt/swift/usr/bin:$PATH"

start=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

step "unit and property tests (swift test)"
# Build chatter and per-test lines are dropped; failures and the closing "Test run with N tests" stay.
swift test --parallel 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]|^Compiling|^Building|^Write|^Emitting|^[^ ]* Test [^ ]+\(.*passed after|^[^ ]* Suite .* passed after|started\.$" 

slow=${REMUSD_SLOW:-$([ "${CI:-}" = true ] && echo 1 || echo 0)}
if [ "$slow" = 1 ]; then
    # The load for the three runs is the decoder fuzzer's long run (one libFuzzer worker per core,
    # as busy as stress-ng --cpu 2), so the two slow checks share their time; should the fuzzer end
    # first, stress-ng --cpu 2 takes over. The fuzzer then runs to its end on its own.
    fuzz_runs=${REMUSD_FUZZ_RUNS:-10000000}
    step "slow tier: the unit suite 3 times under load: the decoder fuzzer's long run ($fuzz_runs inputs, log .build/fuzz-long.log), stress-ng --cpu 2 once it has ended"
    fuzz="" hog=""
    if [ -f Fuzz/run.sh ]; then
        REMUSD_FUZZ_MAX_SECONDS=${REMUSD_FUZZ_MAX_SECONDS:-3600} bash Fuzz/run.sh --runs "$fuzz_runs" > .build/fuzz-long.log 2>&1 &
        fuzz=$!
    fi
    stop_load() {
        [ -z "$hog" ] || { kill "$hog" 2>/dev/null; wait "$hog" 2>/dev/null; } || true
        hog=""
    }
    for run in 1 2 3; do
        if [ -z "$hog" ] && { [ -z "$fuzz" ] || ! kill -0 "$fuzz" 2>/dev/null; }; then
            stress-ng --cpu 2 --timeout 1800s --quiet &
            hog=$!
        fi
        if ! swift test --skip-build --parallel > ".build/under-load-$run.log" 2>&1; then
            stop_load
            [ -z "$fuzz" ] || kill "$fuzz" 2>/dev/null || true
            grep -E "✘|error:" ".build/under-load-$run.log" | head -40 || true
            echo "under load, run $run of 3 failed (full output: .build/under-load-$run.log)"; exit 1
        fi
        grep -E "^✔ Test run with" ".build/under-load-$run.log" | sed "s/^/run $run: /"
    done
    stop_load

    if [ -n "$fuzz" ]; then
        step "slow tier: the decoder fuzzer's long run, to its end ($fuzz_runs inputs)"
        if ! wait "$fuzz"; then
            tail -40 .build/fuzz-long.log
            echo "the decoder fuzzer's long run failed (full output: .build/fuzz-long.log; reproducers in Fuzz/artifacts/)"; exit 1
        fi
        grep -E "^worker |^fuzzed " .build/fuzz-long.log
    fi

    step "slow tier: the replica's page reads racing discard, under ThreadSanitizer"
    bash scripts/tsan/replica-race.sh
fi

step "the Xen backend builds against Debian 13's Xen 4.20 headers too"
bash scripts/xen-headers-check.sh

# The 200 run's guest has no disk: with the 16 MiB disk a failover costs about 2.5 times as much
# here and grows with the run (each activation's I9 check replays the guest from its start), which
# put 200 rounds past 40 minutes on a loaded 2-core machine. The disk is verified in the next run,
# in the fault drill (at every failover) and by the kill points in the unit suite.
step "drills: 200 failovers at random kill points, each verified (a diskless guest)"
.build/release/remusd drill --failovers 200 --quiet --sim-disk-size 0

step "drills: 40 failovers of a guest with a 16 MiB disk, memory and disk (I9) verified at each"
.build/release/remusd drill --failovers 40 --quiet --seed 4040

step "drills: 20 planned switchovers in a row (nothing lost, nothing doubled)"
.build/release/remusd drill --failovers 20 --fault switchover --quiet

step "drills: every bad day in turn, with the etcd witness (crash, switchover, silence, backup-kill, overload, partition)"
.build/release/remusd drill --failovers 24 --fault crash switchover silence backup-kill overload partition --quiet --sim-memory 256

if [ -f Fuzz/run.sh ] && [ "$slow" != 1 ]; then
    step "fuzzing the stream decoder (${REMUSD_FUZZ_SECONDS:-60} s; the slow tier runs ${REMUSD_FUZZ_RUNS:-10000000} inputs instead)"
    bash Fuzz/run.sh "${REMUSD_FUZZ_SECONDS:-60}"
fi

step "fuzzing a live backup over the network (${REMUSD_NET_FUZZ_SECONDS:-60} s; the seed is printed, REMUSD_NET_FUZZ_SEED=N re-runs one)"
REMUSD_NET_FUZZ_SECONDS="${REMUSD_NET_FUZZ_SECONDS:-60}" swift test --skip-build --filter NetworkFuzzTests 2>&1 \
    | grep -E "network fuzz:|✘|↳ seed|Test run with"

if [ -f Tests/Testbed/run.sh ] && [ "${REMUSD_SKIP_TESTBED:-0}" != 1 ]; then
    step "kernel testbed: plug qdisc under QEMU"
    bash Tests/Testbed/run.sh
fi

if [ -f Tests/XenTestbed/run.sh ] && [ "${REMUSD_SKIP_TESTBED:-0}" != 1 ] && [ "${REMUSD_SKIP_XEN_TESTBED:-0}" != 1 ]; then
    step "Xen testbed: remusd and xl remus protecting Xen guests (${REMUSD_XEN_TESTBED_GUESTS:-pvh}) on Xen 4.17 with HAP under QEMU"
    bash Tests/XenTestbed/run.sh
    if [ -f Tests/XenTestbed/two-hosts.sh ]; then
        step "Xen testbed, two hosts (${REMUSD_XEN_TESTBED_GUESTS:-pvh}): the primary host's QEMU killed, the backup host takes over"
        bash Tests/XenTestbed/two-hosts.sh
    fi
    if [ "${REMUSD_XEN_420:-0}" = 1 ]; then
        step "Xen testbed on Debian 13's Xen 4.20 (trixie dom0, kernel 6.12, PVH guest; asked for by REMUSD_XEN_420=1)"
        REMUSD_XEN_TESTBED_RELEASE=4.20 bash Tests/XenTestbed/run.sh
    fi
fi

step "all green"
