#!/usr/bin/env bash
# The README's test command (and CI's): unit and property tests, 200+ verified failovers,
# a bounded fuzz run, the kernel testbed for the plug qdisc, and the Xen testbed (remusd and
# xl remus protecting real Xen domains on Debian 12's Xen 4.17, on one host and across two: a PV
# guest by default, PVH/HVM with REMUSD_XEN_TESTBED_GUESTS=pvh, see below and
# Tests/XenTestbed/README.md).
# REMUSD_SKIP_TESTBED=1 skips every QEMU testbed; REMUSD_SKIP_XEN_TESTBED=1 only the Xen ones;
# REMUSD_FUZZ_SECONDS sets the decoder fuzz time (default 60), REMUSD_NET_FUZZ_SECONDS the network
# fuzzer's (default 60; the unit suite runs it for 8 s) and REMUSD_NET_FUZZ_SEED re-runs one seed.
# The slow tier (REMUSD_SLOW=1; on by default under CI=true, REMUSD_SLOW=0 leaves it out): the
# unit suite three times back to back under a CPU hog (a flake is a bug: none may show), the
# replica read/discard race under ThreadSanitizer, and, last, the decoder fuzzed for up to
# REMUSD_FUZZ_RUNS inputs (default 10^7, one worker per core; 1,665 s in a fresh clone's CI run,
# Docs/stream-format.md §12) for what the run leaves of its budget (REMUSD_TEST_BUDGET, 80 minutes).
# REMUSD_XEN_420=1 adds the Xen testbed's Debian 13 variant (Xen 4.20, a trixie dom0). It is not in
# the default run or CI's yet: it has not passed since the testbed moved to guest kinds
# (Tests/XenTestbed/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# The run's clock starts before setup: REMUSD_TEST_BUDGET bounds the whole run, as CI's limit does.
start=$(date +%s)
bash scripts/setup.sh release tests
[ -x /opt/swift/usr/bin/swift ] && export PATH="/opt/swift/usr/bin:$PATH"
step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

step "unit and property tests (swift test)"
# Build chatter and per-test lines are dropped; failures and the closing "Test run with N tests" stay.
swift test --parallel 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]|^Compiling|^Building|^Write|^Emitting|^[^ ]* Test [^ ]+\(.*passed after|^[^ ]* Suite .* passed after|started\.$" 

slow=${REMUSD_SLOW:-$([ "${CI:-}" = true ] && echo 1 || echo 0)}
if [ "$slow" = 1 ]; then
    step "slow tier: the unit suite 3 times while stress-ng --cpu 2 loads the machine"
    stress-ng --cpu 2 --timeout 1800s --quiet &
    hog=$!
    for run in 1 2 3; do
        if ! swift test --skip-build --parallel > ".build/under-load-$run.log" 2>&1; then
            kill "$hog" 2>/dev/null || true
            grep -E "✘|error:" ".build/under-load-$run.log" | head -40 || true
            echo "under load, run $run of 3 failed (full output: .build/under-load-$run.log)"; exit 1
        fi
        grep -E "^✔ Test run with" ".build/under-load-$run.log" | sed "s/^/run $run: /"
    done
    kill "$hog" 2>/dev/null || true
    wait "$hog" 2>/dev/null || true

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

if [ -f Fuzz/run.sh ]; then
    step "fuzzing the stream decoder (${REMUSD_FUZZ_SECONDS:-60} s)"
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
    # PVH and HVM guests run on the testbed's emulated AMD SVM (QEMU TCG), which now and then
    # corrupts a guest under checkpointing, whichever toolstack checkpoints it: xl remus's guests
    # crash there as remusd's do (Docs/xen.md, "The PVH triple fault"). Proving them needs a CPU
    # with real AMD-V or VT-x; until CI has one, its run protects a PV guest (no SVM in its path,
    # on the newest hypervisor with shadow paging) and says so. REMUSD_XEN_TESTBED_GUESTS=pvh
    # (or "pvh hvm") runs PVH/HVM here all the same.
    export REMUSD_XEN_TESTBED_GUESTS=${REMUSD_XEN_TESTBED_GUESTS:-pv}
    case " $REMUSD_XEN_TESTBED_GUESTS " in
        *" pvh "*) ;;
        *) echo "Xen testbed: PVH guests SKIPPED: under QEMU's TCG the emulated SVM corrupts a checkpointed PVH/HVM guest now and then (xl remus's too; Docs/xen.md); they need a CPU with AMD-V or VT-x. REMUSD_XEN_TESTBED_GUESTS=pvh runs them anyway" ;;
    esac
    step "Xen testbed: remusd and xl remus protecting Xen guests ($REMUSD_XEN_TESTBED_GUESTS) on Xen 4.17 under QEMU"
    bash Tests/XenTestbed/run.sh
    if [ -f Tests/XenTestbed/two-hosts.sh ]; then
        step "Xen testbed, two hosts ($REMUSD_XEN_TESTBED_GUESTS): the primary host's QEMU killed, the backup host takes over"
        bash Tests/XenTestbed/two-hosts.sh
    fi
    if [ "${REMUSD_XEN_420:-0}" = 1 ]; then
        step "Xen testbed on Debian 13's Xen 4.20 (trixie dom0, kernel 6.12, PVH guest; asked for by REMUSD_XEN_420=1)"
        REMUSD_XEN_TESTBED_GUESTS=pvh REMUSD_XEN_TESTBED_RELEASE=4.20 bash Tests/XenTestbed/run.sh
    fi
fi

# The slow tier's decoder fuzzing, last and on what the run leaves of its budget: 10^7 inputs take
# some 25 minutes of this machine's two cores (1,665 s in a fresh clone's CI run), and a run that
# also boots the testbeds seldom leaves that much of the 80 minutes CI allows it (CI stops a run at
# 90). So it fuzzes up to 10^7 inputs (REMUSD_FUZZ_RUNS) for what is left of REMUSD_TEST_BUDGET
# (default 4800 s, counted from the run's start, setup included) less 4 minutes for building the
# harness and the summary, at least 10 minutes; the budget ending it is not a failure, a finding
# is, and the step prints how many inputs ran. With under 14 minutes left it says it was skipped
# and why.
if [ "$slow" = 1 ] && [ -f Fuzz/run.sh ]; then
    fuzz_runs=${REMUSD_FUZZ_RUNS:-10000000}
    left=$(( ${REMUSD_TEST_BUDGET:-4800} - ($(date +%s) - start) - 240 ))
    if [ "$left" -ge 600 ]; then
        step "slow tier: fuzzing the stream decoder for up to $fuzz_runs inputs in $left s (what the run's budget leaves; one worker per core)"
        REMUSD_FUZZ_MAX_SECONDS=$left bash Fuzz/run.sh --up-to "$fuzz_runs"
    else
        step "slow tier: the decoder's long fuzz run SKIPPED: $(( left + 240 )) s are left of the run's ${REMUSD_TEST_BUDGET:-4800} s budget and it needs at least 840; run it alone with 'bash Fuzz/run.sh --runs $fuzz_runs'"
    fi
fi

step "all green"
