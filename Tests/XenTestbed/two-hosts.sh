#!/bin/bash
# The Xen testbed's two-host mode: two QEMUs, two Xen hosts, one wire between them (a QEMU socket
# network). Host A (primary) runs the guest and protects it with remusd towards host B (backup);
# when host A's dom0 says TESTBED KILL-ME, its whole QEMU is killed (host loss) and host B must go
# on running the guest. Once per guest kind (a fresh pair of hosts each). Images come from run.sh
# (build only); each dom0 runs host-role.sh with its role and the kind. Prints both hosts'
# verdict lines (A:/B:) and a table per kind; exits 0 only if every check passed.
#
#   bash Tests/XenTestbed/two-hosts.sh
#
# Environment: as run.sh (REMUSD_XEN_TESTBED_CACHE, _KERNEL, _HYPERVISOR, _REMUS_SECONDS,
# _INTERVAL_MS, _SKIP_BUILD, _SWIFT_TESTS, …, passed on to its build), and
#   REMUSD_XEN_TESTBED_GUESTS      guest kinds, as run.sh's; pv boots both hosts on run.sh's PV
#                                  hypervisor (the newest with shadow paging) [pvh]
#   REMUSD_XEN_TESTBED_TIMEOUT     seconds both QEMUs may run before they are killed [900]
#   REMUSD_XEN_TESTBED_WIRE_PORT   the socket network's TCP port on 127.0.0.1 [a free one]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${REMUSD_XEN_TESTBED_CACHE:-$HOME/.cache/remusd-xen-testbed}
timeout_s=${REMUSD_XEN_TESTBED_TIMEOUT:-900}
remus_seconds=${REMUSD_XEN_TESTBED_REMUS_SECONDS:-20}
guests=${REMUSD_XEN_TESTBED_GUESTS:-pvh}
kinds=$(echo $guests)
interval_ms=${REMUSD_XEN_TESTBED_INTERVAL_MS:-200}
t_start=$(date +%s.%N)
# shellcheck source=../TestbedLib/initramfs.sh
. "$here/../TestbedLib/initramfs.sh"
elapsed() { testbed_elapsed "$1"; }
say() { echo "xen-two-hosts: $*"; }
die() { echo "xen-two-hosts: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "run as root (run.sh's build needs it)"

# --- 1. Images: run.sh builds them (cached); this mode boots its own copy ---------------------
# run.sh (re)writes $cache/dom0.cpio.gz whenever it runs, also for the single-host testbed, so
# the image booted here is a copy, checked to carry this checkout's dom0 scripts and settings.
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
build() {
    REMUSD_XEN_TESTBED_BUILD_ONLY=1 bash "$here/run.sh" 2>&1 | tee "$build_log" | sed 's/^/  /'
}
initrd=$cache/two-hosts-dom0.cpio.gz
copy_checked() {
    local base check
    cache=$(cd "$cache" && pwd)
    base=$(ls -1t "$cache"/dom0-base-*.cpio.gz | head -1)
    cp "$cache/dom0.cpio.gz" "$initrd.tmp"
    cmp -s -n "$(stat -c %s "$base")" "$base" "$initrd.tmp" || return 1
    # The overlay is the second gzip member: unpack the scripts and compare.
    check=$(mktemp -d)
    tail -c +"$(( $(stat -c %s "$base") + 1 ))" "$initrd.tmp" | gzip -dc \
        | cpio -id --quiet -D "$check" init host-role.sh dom0-lib.sh xen-testbed.conf 2>/dev/null || true
    if cmp -s "$check/init" "$here/dom0-init.sh" && cmp -s "$check/host-role.sh" "$here/host-role.sh" \
        && cmp -s "$check/dom0-lib.sh" "$here/dom0-lib.sh" \
        && grep -qx "REMUS_SECONDS=$remus_seconds" "$check/xen-testbed.conf" \
        && grep -qx "INTERVAL_MS=$interval_ms" "$check/xen-testbed.conf"; then
        rm -rf "$check"; mv "$initrd.tmp" "$initrd"
    else
        rm -rf "$check"; return 1
    fi
}
t_build=$(date +%s.%N)
say "building the images with run.sh (REMUSD_XEN_TESTBED_BUILD_ONLY=1)"
build || die "run.sh's build failed"
if ! copy_checked; then
    say "$cache/dom0.cpio.gz was rewritten meanwhile (another run.sh?); building again"
    build || die "run.sh's build failed"
    copy_checked || die "$cache/dom0.cpio.gz does not carry this checkout's dom0-init.sh, host-role.sh and settings"
fi
kver=$(sed -n 's/^xen-testbed: Xen .*, kernel \(.*\)$/\1/p' "$build_log" | tail -1)
# PVH and HVM boot on the HAP hypervisor, PV on the one with shadow paging (run.sh names both).
hv_version=$(sed -n 's/^xen-testbed: hypervisor \(.*\), dom0 tools .*$/\1/p' "$build_log" | tail -1)
pv_version=$(sed -n 's/^xen-testbed: PV hypervisor \(.*\) (shadow paging), dom0 tools .*$/\1/p' "$build_log" | tail -1)
qemu_cpu=$(sed -n 's/^xen-testbed: QEMU -cpu \([^ ]*\).*$/\1/p' "$build_log" | tail -1)
vmlinuz=/boot/vmlinuz-$kver
hypervisor_of() { if [ "$1" = pv ]; then echo "$pv_version"; else echo "$hv_version"; fi; }
[ -n "$kver" ] && [ -r "$vmlinuz" ] || die "no kernel version in run.sh's output"
for kind in $kinds; do
    version=$(hypervisor_of "$kind")
    [ -n "$version" ] && [ -s "$cache/xen-$version.elf" ] || die "no hypervisor for $kind guests in run.sh's output (${version:-none named})"
done
[ -n "$qemu_cpu" ] || die "no QEMU CPU model in run.sh's output"
[ -n "$kinds" ] || die "no guest kind for two hosts in REMUSD_XEN_TESTBED_GUESTS=$guests (pvh, hvm, pv)"
say "images ready ($(elapsed "$t_build") s): $initrd, hypervisor ${hv_version:-none} (HAP), ${pv_version:-none} (PV), kernel $kver"

# --- 2. Both hosts under QEMU (TCG), joined by a socket network -------------------------------
# As run.sh's QEMU, but one vCPU and 3 GiB each: two QEMUs share this 2-core machine. The wire:
# host A's QEMU listens on a local TCP port, host B's connects to it (so B starts after A
# listens); each has one virtio-net-pci NIC on it, bridged in dom0 (host-role.sh).
xen_args="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all dom0_mem=1536M,max:1536M dom0_max_vcpus=1 console_timestamps=boot"
dom0_args="console=hvc0 earlyprintk=xen loglevel=4"
pid_a=""; pid_b=""
stop_qemus() {
    for p in $pid_a $pid_b; do kill -9 "$p" 2>/dev/null || true; done
    rm -f "$build_log"
}
trap stop_qemus EXIT

# The QEMU lock for the whole run (one QEMU session at a time on this machine; run.sh takes the
# same lock around its own QEMU). The QEMUs do not inherit it: it ends with this script.
exec 9> /tmp/remusd-qemu.lock
say "waiting for the QEMU lock (/tmp/remusd-qemu.lock)"
t_lock=$(date +%s.%N)
flock 9
say "got the QEMU lock after $(elapsed "$t_lock") s"

listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

qemu() {  # role, console log, netdev, MAC, guest kind
    nice -n 10 "${REMUSD_XEN_TESTBED_QEMU:-qemu-system-x86_64}" -accel tcg,thread=multi -cpu "$qemu_cpu" -m 3G -smp 1 \
        -display none -monitor none -no-reboot -serial "file:$2" \
        -netdev "socket,id=n0,$3" -device "virtio-net-pci,netdev=n0,mac=$4" \
        -kernel "$cache/xen-$(hypervisor_of "$5").elf" -append "$xen_args" -initrd "$vmlinuz $dom0_args testbed_role=$1 testbed_guests=$5,$initrd" \
        9>&- > "$2.qemu-out" 2>&1 &
}

# One pair of hosts protecting a guest of kind $1: boots both, kills host A when it asks, prints
# the verdicts and the table; sets failed=1 when a check failed.
pair() {
    port=${REMUSD_XEN_TESTBED_WIRE_PORT:-}
    if [ -z "$port" ]; then
        for p in $(shuf -i 20000-29999 -n 50); do listening "$p" || { port=$p; break; }; done
    fi
    [ -n "$port" ] || die "no free TCP port for the socket network"
    kind=$1
    log_a=$cache/two-hosts-$kind-A.console
    log_b=$cache/two-hosts-$kind-B.console
    rm -f "$log_a" "$log_a.txt" "$log_b" "$log_b.txt"
    t_qemu=$(date +%s.%N)
    qemu primary "$log_a" "listen=127.0.0.1:$port" 52:54:00:5e:00:0a "$kind"
    pid_a=$!
    deadline=$(( $(date +%s) + 20 ))
    until listening "$port"; do
        kill -0 "$pid_a" 2>/dev/null && [ "$(date +%s)" -lt $deadline ] \
            || { cat "$log_a.qemu-out" >&2; die "host A's QEMU does not listen on 127.0.0.1:$port"; }
        sleep 0.2
    done
    qemu backup "$log_b" "connect=127.0.0.1:$port" 52:54:00:5e:00:0b "$kind"
    pid_b=$!
    say "$kind: host A (primary, QEMU $pid_a) listens on 127.0.0.1:$port, host B (backup, QEMU $pid_b) connected; consoles in $log_a, $log_b"

    # --- 3. Orchestration: kill host A when it asks, wait for host B's verdict ------------------
    has() { [ -f "$1" ] && grep -aq "$2" "$1"; }
    boot_a=""; boot_b=""; t_kill=""; kill_at=""; a_ended=""; timed_out=""; early=""; a_quiet=""
    a_size=0; a_changed=$t_qemu   # when host A's console last grew
    deadline=$(( ${t_qemu%.*} + timeout_s ))
    while :; do
        [ -n "$boot_a" ] || ! has "$log_a" "TESTBED BOOTED" || boot_a=$(elapsed "$t_qemu")
        [ -n "$boot_b" ] || ! has "$log_b" "TESTBED BOOTED" || boot_b=$(elapsed "$t_qemu")
        size=$(stat -c %s "$log_a" 2>/dev/null || echo 0)
        [ "$size" = "$a_size" ] || { a_size=$size; a_changed=$(date +%s.%N); }
        # Host B must only see host A lost once it was killed; before, host A merely stalled.
        if [ -z "$t_kill" ] && [ -z "$early" ] && has "$log_b" "^TESTBED INFO: .*host A lost"; then
            early=$(elapsed "$t_qemu"); a_quiet=$(elapsed "$a_changed")
            say "host B declared host A lost at +$early s, but host A was not killed (its console silent for $a_quiet s)"
        fi
        if [ -z "$t_kill" ] && [ -z "$a_ended" ]; then
            if has "$log_a" "^TESTBED KILL-ME"; then
                kill -9 "$pid_a"
                t_kill=$(date +%s.%N); kill_at=$(elapsed "$t_qemu")
                wait "$pid_a" 2>/dev/null || true
                say "host A asked; its QEMU killed with SIGKILL at +$kill_at s (host loss)"
            elif ! kill -0 "$pid_a" 2>/dev/null; then
                a_ended=$(elapsed "$t_qemu"); say "host A's QEMU ended by itself at +$a_ended s"
            fi
        fi
        if ! kill -0 "$pid_b" 2>/dev/null; then break; fi
        if [ "$(date +%s)" -ge $deadline ]; then timed_out=1; break; fi
        sleep 0.5
    done
    # Host A stalled while host B took over: a little longer for host A, so its console shows what
    # remusd there saw (host-role.sh prints remusd's log once protection is no longer PROTECTED).
    if [ -n "$early" ] && [ -z "$t_kill" ] && kill -0 "$pid_a" 2>/dev/null; then
        say "host A still runs: 30 s more for its console"
        t_more=$(date +%s)
        while [ $(( $(date +%s) - t_more )) -lt 30 ] && ! has "$log_a" "^TESTBED KILL-ME"; do sleep 1; done
    fi
    for p in $pid_a $pid_b; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pid_a=""; pid_b=""
    run_s=$(elapsed "$t_qemu")

    # --- 4. Verdicts and the table ------------------------------------------------------------
    tr -d '\r' 2> /dev/null < "$log_a" > "$log_a.txt" || : > "$log_a.txt"
    tr -d '\r' 2> /dev/null < "$log_b" > "$log_b.txt" || : > "$log_b.txt"
    echo
    grep -aE "^TESTBED (PASS|FAIL|INFO|SKIP)" "$log_a.txt" | sed 's/^/A: /' || true
    grep -aE "^TESTBED (PASS|FAIL|INFO|SKIP)" "$log_b.txt" | sed 's/^/B: /' || true
    [ -z "$t_kill" ] || echo "host: TESTBED PASS: host A's QEMU killed with SIGKILL at +$kill_at s, when its dom0 asked (host loss)"
    metric() { sed -n "s/^TESTBED METRIC $2 \([^ ]*\).*/\1/p" "$1" | tail -1; }
    a() { metric "$log_a.txt" "$1"; }
    b() { metric "$log_b.txt" "$1"; }
    dom0_up() { sed -n 's/.*TESTBED BOOTED uptime=\([0-9.]*\).*/\1/p' "$1" | head -1; }
    row() { printf '  %-52s %12s  %s\n' "$1" "${2:-—}" "$3"; }
    echo
    echo "Two hosts, $(echo "$kind" | tr a-z A-Z) guest: remusd protect --backend xen -i $interval_ms on host A, remusd receive on host B;"
    echo "host A's QEMU killed (SIGKILL) after $remus_seconds s of protection. Hypervisor $(hypervisor_of "$kind"), QEMU TCG ($qemu_cpu), 1 vCPU per host"
    row "measure" "value" "unit"
    row "QEMU start to dom0 /init, host A / host B" "${boot_a:-?} / ${boot_b:-?}" "s"
    row "dom0 kernel to /init (dom0 uptime), A / B" "$(dom0_up "$log_a.txt") / $(dom0_up "$log_b.txt")" "s"
    row "ping over the socket network, A / B" "$(a wire_rtt_ms) / $(b wire_rtt_ms)" "ms"
    row "A: xl create of the guest" "$(a xl_create_s)" "s"
    row "A: guest counter rate, unprotected" "$(a counter_rate_free)" "1/s"
    row "A: remusd protect to PROTECTED (first sync)" "$(a remusd_sync_s)" "s"
    row "A: checkpoints acknowledged" "$(a checkpoints_acknowledged)" ""
    row "A: checkpoints per second" "$(a checkpoints_per_s)" "1/s"
    row "A: pause p50 / p99" "$(a pause_p50_us) / $(a pause_p99_us)" "µs"
    row "A: guest counter rate, protected" "$(a counter_rate_protected)" "1/s"
    row "QEMU start to host A killed" "${kill_at:-—}" "s"
    row "B: guest silent to remusd noticing the loss" "$(b failover_lost_s)" "s"
    row "B: guest silent to ACTIVATED" "$(b failover_activated_s)" "s"
    row "B: guest silent to domain running on B" "$(b failover_running_s)" "s"
    row "B: loss noticed to guest answering TCP on B" "$(b failover_answer_s)" "s"
    row "B: no TCP answer for (last before, first after)" "$(b outage_s)" "s"
    row "B: counter before loss / after failover" "$(b counter_before_loss) / $(b counter_after_failover)" ""
    row "B: largest step back of the answered counter" "$(b counter_went_back)" ""
    echo
    echo "xen-two-hosts: $kind timing: both QEMUs $run_s s (dom0 /init after ${boot_a:-?} s on A, ${boot_b:-?} s on B; A killed at +${kill_at:-—} s)"

    if [ -n "$timed_out" ]; then echo "host: TESTBED FAIL: the hosts did not finish within $timeout_s s (REMUSD_XEN_TESTBED_TIMEOUT)"; failed=1; fi
    if [ -n "$early" ]; then
        echo "host: TESTBED FAIL: host B declared host A lost at +$early s while host A's QEMU still ran (not killed; its console silent for $a_quiet s): host A stalled, and a takeover with --fence true would not be safe"
        failed=1
    fi
    if [ -z "$t_kill" ] && [ -z "$early" ]; then
        echo "host: TESTBED FAIL: host A never asked to be killed${a_ended:+ (its QEMU ended at +$a_ended s)}; last console lines:"
        tail -15 "$log_a.txt"; failed=1
    fi
    if ! grep -aq "^TESTBED DONE" "$log_b.txt"; then
        echo "host: TESTBED FAIL: host B's role did not finish; last console lines:"
        tail -25 "$log_b.txt"; failed=1
    fi
    if grep -aq "^TESTBED FAIL" "$log_a.txt" "$log_b.txt" || ! grep -aq "^TESTBED PASS" "$log_b.txt"; then failed=1; fi
    passed=$((passed + $(cat "$log_a.txt" "$log_b.txt" | grep -ac '^TESTBED PASS')))
}

failed=0; passed=0
for kind in $kinds; do pair "$kind"; done
exec 9>&-   # the lock
echo "xen-two-hosts: timing: total $(elapsed "$t_start") s"
if [ $failed -ne 0 ]; then echo "xen-two-hosts: FAILED"; exit 1; fi
echo "xen-two-hosts: all $passed checks passed ($kinds)"
