#!/bin/sh
# Runs in the testbed's dom0: Xen's services, remusd and RemusXenTests in dom0, the bridge, then
# for each guest kind named (pvh, hvm, pv) xen-guest-tests.sh: the guest, Xen's own `xl remus -F
# -n` as the baseline, and remusd protecting the same guest.
#
#   sh /xen-tests.sh pvh hvm     (dom0-init.sh runs it with the kinds run.sh put on the command line)
#
# Console lines: TESTBED PASS|FAIL|INFO: …  and  TESTBED METRIC <name> <value>; each kind's part
# starts with TESTBED KIND <kind> (run.sh turns each part's metrics into that kind's tables).
. /xen-testbed.conf   # REMUS_SECONDS INTERVAL_MS XL_BASELINE

. /dom0-lib.sh


# --- 1. Xen's services --------------------------------------------------------------------
t=$(now)
/etc/init.d/xen start > /tmp/xen-start.log 2>&1
if xl info > /tmp/xl-info.txt 2>&1; then
    metric xen_services_s "$(since "$t")"
    pass "Xen's services started: $(awk -F': ' '/^xen_version/ { v = $2 } /^free_memory/ { m = $2 } END { printf "Xen %s, %s MiB free", v, m }' /tmp/xl-info.txt)"
else
    fail "xl info after /etc/init.d/xen start"; show /tmp/xen-start.log /tmp/xl-info.txt; exit 0
fi

# --- 2. remusd and the RemusXen tests in dom0 ---------------------------------------------
if remusd --help > /tmp/remusd-help.txt 2>&1 && grep -q "protect" /tmp/remusd-help.txt; then
    pass "remusd --help runs in dom0"
else
    fail "remusd --help in dom0"; show /tmp/remusd-help.txt
fi
if [ -x /usr/bin/remusd-tests ]; then
    t=$(now)
    NO_COLOR=1 remusd-tests --testing-library swift-testing --filter RemusXenTests > /tmp/swift-tests.out 2>&1
    rc=$?
    found=$(grep -a "XenHost.detect: Xen" /tmp/swift-tests.out | head -1)
    summary=$(grep -ao "Test run with [0-9]* tests.*" /tmp/swift-tests.out | tail -1)
    if [ $rc -eq 0 ] && [ -n "$found" ]; then
        pass "RemusXenTests in dom0 ($(since "$t") s): $summary"
        info "$found"
    else
        fail "RemusXenTests in dom0 (exit $rc): ${summary:-no summary}"
        grep -a -A2 "recorded an issue" /tmp/swift-tests.out | sed 's/^/    | /'
        show /tmp/swift-tests.out
    fi
else
    info "RemusXenTests not in this image (REMUSD_XEN_TESTBED_SWIFT_TESTS=0 or not built)"
fi

# --- 3. The bridge, and each guest kind in turn --------------------------------------------
modprobe xen-netback
modprobe bridge
ip link add xenbr0 type bridge && ip addr add 10.0.0.1/24 dev xenbr0 && ip link set xenbr0 up \
    || fail "bridge xenbr0"
for kind in "$@"; do
    echo "TESTBED KIND $kind"
    sh /xen-guest-tests.sh "$kind"
    # Nothing of one kind's run may reach the next: processes it left, domains, consoles.
    leftovers=$(ps -eo pid,args | awk '/remusd (protect|receive)|xl (remus|migrate-receive)|libxl-save-helper|socat -u UDP-RECV/ && !/awk/ { print $1 }' | tr '\n' ' ')
    [ -z "$leftovers" ] || { info "$kind: ended what its run left: $(ps -o pid,args -p "$(echo $leftovers | tr ' ' ',')" | tail -n +2 | cut -c1-80 | paste -sd ';')"; kill -9 $leftovers 2>/dev/null; }
    cleanup_domains
    wait_no_domains 60 || fail "$kind: domains left after its run: $(xl list | awk 'NR > 2 { print $1 }' | tr '\n' ' ')"
    mkdir -p "/tmp/$kind" && mv /tmp/*.log /tmp/*.txt /tmp/*.out "/tmp/$kind/" 2>/dev/null
    mkdir -p "$console_dir/$kind" && mv "$console_dir"/*.log "$console_dir/$kind/" 2>/dev/null
done
