# Shared by the dom0 scripts of the Xen testbed (xen-tests.sh, host-role.sh): verdict lines,
# uptime arithmetic, processes, the guest's counter, the guest's configuration and its start.
# Console lines: TESTBED PASS|FAIL|INFO: …  and  TESTBED METRIC <name> <value>.
guest_ip=${guest_ip:-10.0.0.2}
console_dir=/var/log/xen/console

pass() { echo "TESTBED PASS: $*"; }
fail() { echo "TESTBED FAIL: $*"; }
info() { echo "TESTBED INFO: $*"; }
metric() { echo "TESTBED METRIC $1 $2"; }
now() { read -r up _ < /proc/uptime; echo "$up"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
show() { for f in "$@"; do echo "    --- $f"; tail -40 "$f" 2>/dev/null | sed 's/^/    | /'; done; }
# Timestamps every line with dom0's uptime (seconds), so the log can be measured afterwards.
stamp() { while IFS= read -r line; do read -r up _ < /proc/uptime; printf '%s %s\n' "$up" "$line"; done; }
# Process ids whose command line matches a shell pattern.
pids_matching() {
    for d in /proc/[0-9]*; do
        c=$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null) || continue
        case "$c" in $1) echo "${d#/proc/}" ;; esac
    done
}
# The last counter value a console log shows (empty if none yet).
last_counter() { grep -ao 'COUNTER [0-9]*' "$1" 2>/dev/null | tail -1 | cut -d' ' -f2; }
# The counter as the guest answers it over TCP (empty if it does not answer). busybox nc's -w
# bounds only the connect: `timeout` bounds a guest that vanishes mid-answer (its host killed).
ask_counter() { timeout 3 busybox nc -w 1 "$guest_ip" 7 < /dev/null 2>/dev/null | sed -n 's/^COUNTER \([0-9]*\).*/\1/p' | head -1; }

# The guest (guest-init.sh in a busybox initramfs; PV, or PVH on 4.20: GUEST_TYPE): 128 MiB, 1 vCPU,
# one vif on xenbr0. It never reboots by itself: a reboot is a crash (an HVM container's triple
# fault is reported as one), kept for inspection instead of a fresh guest with the same address.
write_guest_config() {
    cat > /etc/xen/guest.cfg <<CFG
name = "guest"
type = "${GUEST_TYPE:-pv}"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.cpio.gz"
extra = "console=hvc0 loglevel=4"
memory = 128
maxmem = 128
vcpus = 1
vif = [ 'mac=00:16:3e:5e:00:02,bridge=xenbr0' ]
on_crash = "preserve"
on_reboot = "preserve"
CFG
}

# Creates the guest and waits (at most 180 s) until its console shows the counter running;
# verdicts and metrics say how long each took. Returns 1 after a FAIL line.
start_guest() {
    write_guest_config
    t=$(now)
    if ! xl create /etc/xen/guest.cfg > /tmp/xl-create.log 2>&1; then
        fail "xl create guest$1"; show /tmp/xl-create.log; return 1
    fi
    metric xl_create_s "$(since "$t")"
    pass "xl create guest$1 ($(since "$t") s)"
    guest_log=$console_dir/guest-guest.log
    deadline=$(( ${t%.*} + 180 ))
    while [ "$(last_counter "$guest_log")" = "" ] || [ "$(last_counter "$guest_log")" -lt 2 ]; do
        [ "$(now | cut -d. -f1)" -lt $deadline ] || break
        sleep 1
    done
    if [ -z "$(last_counter "$guest_log")" ]; then
        fail "no counter from the guest within 180 s"; show "$guest_log" /tmp/xl-create.log; return 1
    fi
    metric guest_counter_s "$(since "$t")"
    pass "guest counter runs$1: $(grep -a COUNTER "$guest_log" | tail -1)"
}
