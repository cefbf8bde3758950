# Shared by the dom0 scripts of the Xen testbed (xen-tests.sh, host-role.sh): verdict lines,
# uptime arithmetic, processes, the guest's counter, the guest's configuration and its start.
# Console lines: TESTBED PASS|FAIL|INFO: …  and  TESTBED METRIC <name> <value>.
guest_ip=${guest_ip:-10.0.0.2}
console_dir=/var/log/xen/console

# Verdicts name the guest kind when a script tests one (testbed_kind, set before this file is read).
pass() { echo "TESTBED PASS: ${testbed_kind:+$testbed_kind: }$*"; }
fail() { echo "TESTBED FAIL: ${testbed_kind:+$testbed_kind: }$*"; }
info() { echo "TESTBED INFO: ${testbed_kind:+$testbed_kind: }$*"; }
metric() { echo "TESTBED METRIC $1 $2"; }
now() { read -r up _ < /proc/uptime; echo "$up"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
show() { for f in "$@"; do echo "    --- $f"; tail -40 "$f" 2>/dev/null | sed 's/^/    | /'; done; }
# Timestamps every line with dom0's uptime (seconds), so the log can be measured afterwards.
stamp() { while IFS= read -r line; do read -r up _ < /proc/uptime; printf '%s %s\n' "$up" "$line"; done; }
# Process ids whose command line matches a shell pattern.
pids_matching() {
    for d in /proc/[0-9]*; do
        # The error redirection first: a process that ends meanwhile fails the input redirection.
        c=$(tr '\0' ' ' 2>/dev/null < "$d/cmdline") || continue
        case "$c" in $1) echo "${d#/proc/}" ;; esac
    done
}
# CPU seconds (user + system) the processes matching $1 have used so far, as "total N s" (with
# threads that ended) and then each live thread's, summed by thread name, largest first.
thread_cpu() {
    printf 'total %s s' "$(for p in $(pids_matching "$1"); do cat /proc/"$p"/stat 2>/dev/null; done | stat_cpu_sum)"
    for p in $(pids_matching "$1"); do cat /proc/"$p"/task/*/stat 2>/dev/null; done |
        awk -v hz="$(getconf CLK_TCK 2>/dev/null || echo 100)" '
            { l = $0; i = index(l, "("); j = 0
              for (k = length(l); k > i; k--) if (substr(l, k, 1) == ")") { j = k; break }
              name = substr(l, i + 1, j - i - 1); gsub(/ /, "_", name)
              split(substr(l, j + 2), f, " "); cpu[name] += (f[12] + f[13]) / hz }
            END { for (n in cpu) if (cpu[n] >= 0.01) printf "%.2f %s\n", cpu[n], n }' |
        sort -rn | awk '{ printf "%s%s %.2f s", (NR > 1 ? ", " : ": "), $2, $1 } END { print "" }'
}
# The summed utime + stime of /proc/*/stat lines on stdin, in seconds.
stat_cpu_sum() {
    awk -v hz="$(getconf CLK_TCK 2>/dev/null || echo 100)" '{ l = $0; j = 0
        for (k = length(l); k > 0; k--) if (substr(l, k, 1) == ")") { j = k; break }
        split(substr(l, j + 2), f, " "); t += (f[12] + f[13]) / hz } END { printf "%.2f", t }'
}
# The ids of domains Xen holds as crashed (on_crash = "preserve" keeps them): a guest that
# crashed while protected takes its later checks' timeouts with it, so the sections stop there.
crashed_domains() { timeout 20 xl list 2>/dev/null | awk 'NR > 1 && $5 ~ /c/ { print $2 }' | xargs; }
# Destroys every domain but dom0, and waits (at most $1 s, default 60) until Xen has let them go.
cleanup_domains() { for id in $(xl list 2>/dev/null | awk 'NR > 1 && $2 != 0 { print $2 }'); do timeout 60 xl destroy "$id" > /dev/null 2>&1; done; }
wait_no_domains() {
    deadline=$(( $(now | cut -d. -f1) + ${1:-60} ))
    while [ "$(timeout 20 xl list 2>/dev/null | awk 'NR > 2' | wc -l)" -ne 0 ]; do
        [ "$(now | cut -d. -f1)" -lt $deadline ] || return 1
        sleep 1
    done
}

# What a failed check needs to be understood: the domains, every remusd (its status, where each
# of its threads waits), the newest logs of this run, the guests' consoles and Xen's own log.
diagnose() {
    echo "    --- diagnosis at uptime $(now)"
    timeout 20 xl list 2>&1 | sed 's/^/    | /'
    for p in $(pids_matching "remusd *"); do
        echo "    --- process $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-120)"
        for t in /proc/"$p"/task/*; do
            printf '    | thread %s %s state %s wchan %s syscall %s\n' "${t##*/}" "$(cat "$t/comm" 2>/dev/null)" \
                "$(awk '{ print $3 }' "$t/stat" 2>/dev/null)" "$(cat "$t/wchan" 2>/dev/null)" "$(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
        done
    done
    [ -S /run/remusd/guest.sock ] && timeout 10 remusd status --socket /run/remusd/guest.sock 2>&1 | sed 's/^/    | status: /'
    echo "    --- processes: $(ps -eo pid,stat,args | awk '/xl |remusd|libxl|qemu-system|socat/ && !/awk/ { printf "%s %s %s; ", $1, $2, substr($0, index($0, $3), 60) }')"
    for f in $(ls -1t /tmp/protect*.log /tmp/receive*.log /tmp/remus*.log 2>/dev/null | head -3); do
        echo "    --- $f (last 25 lines)"; tail -25 "$f" | sed 's/^/    | /'
    done
    for f in "$console_dir"/*.log; do
        [ -e "$f" ] || continue
        echo "    --- $f (last 5 lines)"; tail -5 "$f" | sed 's/^/    | /'
    done
    # A guest that crashed or rebooted is kept (on_crash, on_reboot = preserve): its vCPU state
    # at that moment (an HVM container's triple fault: where it ran, its IDT and page tables).
    for id in $(timeout 20 xl list 2>/dev/null | awk 'NR > 1 && $5 ~ /[sc]/ { print $2 }'); do
        echo "    --- domain $id shut down or crashed: xen-hvmctx (CPU)"
        timeout 20 xen-hvmctx "$id" 2>&1 | grep -A 34 '    CPU: ' | head -36 | tee /tmp/hvmctx.txt | sed 's/^/    | /'
        # dom0 runs the same kernel image, loaded unrandomised like a PVH guest's: its symbols
        # name the guest's rip.
        rip=$(sed -n 's/.* rip 0x\([0-9a-f]*\).*/\1/p' /tmp/hvmctx.txt | head -1)
        if [ -n "$rip" ]; then
            near=$(awk -v r="$rip" '$1 <= r' /proc/kallsyms | sort | tail -1)
            if [ -z "$near" ]; then
                near="no symbol at or below it in dom0's /proc/kallsyms, kptr_restrict $(cat /proc/sys/kernel/kptr_restrict 2>/dev/null), first entry: $(head -1 /proc/kallsyms)"
            fi
            echo "    | rip $rip is after: $near"
        fi
    done
    echo "    --- xl dmesg (last 15 lines)"; timeout 20 xl dmesg 2>&1 | tail -15 | sed 's/^/    | /'
    # xl's own log of each domain: why libxl ended one (a device's hotplug script, a shutdown).
    for f in /var/log/xen/xl-*.log; do
        [ -e "$f" ] || continue
        echo "    --- $f (last 10 lines)"; tail -10 "$f" | sed 's/^/    | /'
    done
}

# The last counter value a console log shows (empty if none yet).
last_counter() { grep -ao 'COUNTER [0-9]*' "$1" 2>/dev/null | tail -1 | cut -d' ' -f2; }
# The counter as the guest answers it over TCP (empty if it does not answer). busybox nc's -w
# bounds only the connect: `timeout` bounds a guest that vanishes mid-answer (its host killed).
ask_counter() { timeout 3 busybox nc -w 1 "$guest_ip" 7 < /dev/null 2>/dev/null | sed -n 's/^COUNTER \([0-9]*\).*/\1/p' | head -1; }

# The guest (guest-init.sh in a busybox initramfs, Debian's kernel): 128 MiB, 1 vCPU, one vif on
# xenbr0, of the kind $testbed_kind (pvh unless set): PV and PVH boot the kernel directly with
# the console on hvc0; HVM boots it through hvmloader and SeaBIOS (QEMU's direct kernel boot),
# the kernel's early messages on the emulated serial port (QEMU's, not logged), /dev/console on
# hvc0 (the PV console xenconsoled serves and logs, for HVM too), and its NIC is a PV vif only
# (no emulated one beside it that remusd's buffering would not see). It never reboots by
# itself: a reboot is a crash (an HVM container's triple fault is reported as one), kept for
# inspection instead of a fresh guest with the same address.
write_guest_config() {
    case "${testbed_kind:-pvh}" in
        pv|pvh) kind_lines="type = \"${testbed_kind:-pvh}\"
extra = \"console=hvc0 loglevel=4\"
vif = [ 'mac=00:16:3e:5e:00:02,bridge=xenbr0' ]" ;;
        hvm) kind_lines="type = \"hvm\"
extra = \"console=ttyS0 console=hvc0 loglevel=4\"
serial = \"pty\"
vga = \"none\"
nographic = 1
vif = [ 'mac=00:16:3e:5e:00:02,bridge=xenbr0,type=vif' ]" ;;
    esac
    cat > /etc/xen/guest.cfg <<CFG
name = "guest"
$kind_lines
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.cpio.gz"
memory = 128
maxmem = 128
vcpus = 1
on_crash = "preserve"
on_reboot = "preserve"
CFG
}

# The counter's rate without protection, from console log $1 over 10 s: the reference for the
# protected rate (metric counter_rate_free).
measure_free_rate() {
    c1=$(last_counter "$1"); t1=$(now)
    sleep 10
    c2=$(last_counter "$1"); t2=$(now)
    metric counter_rate_free "$(awk -v a="$c1" -v b="$c2" -v s="$t1" -v e="$t2" 'BEGIN { printf "%.2f", (b - a) / (e - s) }')"
}

# How long a guest may take from xl create to its counter: seconds on a quiet machine, minutes
# under TCG when other work loads the host (measured: 137 s to the kernel's event channel setup
# at load 10 on 2 cores).
guest_boot_s=300
# Creates the guest and waits (at most guest_boot_s) until its console shows the counter
# running; verdicts and metrics say how long each took. Returns 1 after a FAIL line.
start_guest() {
    write_guest_config
    t=$(now)
    if ! xl create /etc/xen/guest.cfg > /tmp/xl-create.log 2>&1; then
        fail "xl create guest$1"; show /tmp/xl-create.log; return 1
    fi
    metric xl_create_s "$(since "$t")"
    pass "xl create guest$1 ($(since "$t") s)"
    guest_log=$console_dir/guest-guest.log
    deadline=$(( ${t%.*} + guest_boot_s ))
    while [ "$(last_counter "$guest_log")" = "" ] || [ "$(last_counter "$guest_log")" -lt 2 ]; do
        [ "$(now | cut -d. -f1)" -lt $deadline ] || break
        sleep 1
    done
    if [ -z "$(last_counter "$guest_log")" ]; then
        fail "no counter from the guest within $guest_boot_s s"; show "$guest_log" /tmp/xl-create.log; diagnose; return 1
    fi
    metric guest_counter_s "$(since "$t")"
    pass "guest counter runs$1: $(grep -a COUNTER "$guest_log" | tail -1)"
}
