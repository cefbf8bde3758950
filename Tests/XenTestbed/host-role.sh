#!/bin/sh
# Runs in each dom0 of the two-host testbed (Tests/XenTestbed/two-hosts.sh): host A (primary)
# runs the guest and protects it with remusd towards host B (backup); two-hosts.sh then kills
# host A's whole QEMU (host loss) and host B must go on running the guest.
#
#   sh /host-role.sh primary|backup [pvh|hvm|pv]   (dom0-init.sh runs it when /proc/cmdline has
#                                                   testbed_role=…, with testbed_guests' kind)
#
# The wire: one virtio NIC per host on a QEMU socket netdev, bridged into xenbr0 in each dom0:
# host A 10.0.0.1, the guest 10.0.0.2 (on A's bridge, later on B's), host B 10.0.0.3, one L2
# segment. Console lines as in xen-tests.sh: TESTBED PASS|FAIL|INFO: …, TESTBED METRIC <name>
# <value>; host A ends with TESTBED KILL-ME, the cue for two-hosts.sh to kill its QEMU.
. /xen-testbed.conf   # REMUS_SECONDS INTERVAL_MS
role=$1
testbed_kind=${2:-pvh}   # the guest's kind (dom0-lib.sh's write_guest_config)
host_a=10.0.0.1
guest_ip=10.0.0.2
host_b=10.0.0.3
port=7788

. /dom0-lib.sh
now_s() { now | cut -d. -f1; }
diff_s() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# The uptime stamp of the first line of a stamped log matching a pattern (empty if none).
stamp_of() { awk -v p="$2" '$0 ~ p { print $1; exit }' "$1" 2>/dev/null; }
# State column of `xl list` for a domain name ("r-----", "--p---", …; empty if it does not exist).
domain_state() { timeout 20 xl list "$1" 2>/dev/null | awk 'NR == 2 { print $5 }'; }
# The largest step backwards of the counter answered over TCP (/tmp/answers.txt: "<uptime> <n|->").
went_back() { awk '$2 != "-" { if (have && prev - $2 > max) max = prev - $2; prev = $2; have = 1 } END { print max + 0 }' /tmp/answers.txt; }

# --- Both roles: Xen's services, the bridge on the wire, the other host -----------------------
xen_services() {
    t=$(now)
    /etc/init.d/xen start > /tmp/xen-start.log 2>&1
    if xl info > /tmp/xl-info.txt 2>&1; then
        metric xen_services_s "$(since "$t")"
        pass "Xen's services started: $(awk -F': ' '/^xen_version/ { v = $2 } /^free_memory/ { m = $2 } /^nr_cpus/ { c = $2 } END { printf "Xen %s, %s CPU, %s MiB free", v, c, m }' /tmp/xl-info.txt)"
    else
        fail "xl info after /etc/init.d/xen start"; show /tmp/xen-start.log /tmp/xl-info.txt; return 1
    fi
}

# The wire to the other host is a virtio-net-pci NIC on QEMU's socket netdev; no udev in this
# dom0, so nothing loads its driver by itself. The NIC is found by its driver, not by a name.
bridge_up() {
    modprobe virtio_pci && modprobe virtio_net && modprobe bridge && modprobe xen-netback \
        || { fail "modprobe virtio_pci virtio_net bridge xen-netback"; return 1; }
    nic=""; deadline=$(( $(now_s) + 20 ))
    while [ -z "$nic" ] && [ "$(now_s)" -lt $deadline ]; do
        for d in /sys/class/net/*; do
            [ "$(basename "$(readlink "$d/device/driver" 2>/dev/null)")" = virtio_net ] && nic=${d##*/} && break
        done
        [ -n "$nic" ] || sleep 1
    done
    [ -n "$nic" ] || { fail "no virtio_net interface within 20 s ($(ls /sys/class/net | tr '\n' ' '))"; return 1; }
    if ip link set "$nic" up && ip link add xenbr0 type bridge && ip link set "$nic" master xenbr0 \
        && ip addr add "$1/24" dev xenbr0 && ip link set xenbr0 up; then
        info "bridge xenbr0 $1/24 over $nic ($(cat "/sys/class/net/$nic/address"))"
    else
        fail "bridge xenbr0 over $nic"; ip addr; return 1
    fi
}

# Pings the other host until it answers: both hosts boot at once, either may be first.
wait_for_peer() {
    t=$(now); deadline=$(( $(now_s) + 300 ))
    until busybox ping -c 1 -W 1 "$1" > /dev/null 2>&1; do
        [ "$(now_s)" -lt $deadline ] || { fail "$2 ($1) does not answer ping within 300 s"; ip addr; ip link; return 1; }
        sleep 1
    done
    rtt=$(busybox ping -c 5 -q "$1" 2>/dev/null | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
    metric wire_rtt_ms "${rtt:-?}"
    pass "$(hostname) pings $2 ($1) over the QEMU socket network (after $(since "$t") s waiting; rtt ${rtt:-?} ms)"
}

# --- Host A: the guest, protected by remusd towards host B; then asks to be killed ------------
# Whatever fails, host A still ends in TESTBED KILL-ME: the kill and host B's side of the run
# are exercised either way.
kill_me() {
    c=$(last_counter "$console_dir/guest-guest.log")
    [ -n "$c" ] && metric counter_at_kill_request "$c"
    info "host A asks to be killed (guest counter ${c:-?}; the guest's last console lines follow)"
    tail -3 "$console_dir/guest-guest.log" 2>/dev/null | sed 's/^/    | /'
    echo "TESTBED KILL-ME"
    while :; do sleep 3600; done
}

primary() {
    hostname host-a
    xen_services || kill_me
    bridge_up "$host_a" || kill_me
    wait_for_peer "$host_b" "host B" || kill_me

    start_guest " on host A" || kill_me
    log=$guest_log
    answer=$(ask_counter)
    if [ -n "$answer" ]; then pass "guest answers TCP on port 7 from host A (counter $answer)"; else fail "guest does not answer TCP on port 7 from host A"; fi
    measure_free_rate "$log"

    # remusd receive on host B listens before host B starts watching the guest. The probe is a
    # bare connect and close (busybox nc has no -z): remusd receive logs a failed handshake.
    t=$(now); deadline=$(( $(now_s) + 300 ))
    until timeout 3 bash -c ": <> /dev/tcp/$host_b/$port" 2> /dev/null; do
        [ "$(now_s)" -lt $deadline ] || { fail "remusd receive on host B ($host_b:$port) does not accept connections within 300 s"; kill_me; }
        sleep 1
    done
    pass "remusd receive on host B accepts connections on $host_b:$port (after $(since "$t") s waiting)"

    info "remusd protect guest $host_b:$port --backend xen --interval $INTERVAL_MS --heartbeat 200 --timeout 3000"
    t_protect=$(now)
    remusd protect guest "$host_b:$port" --backend xen --interval "$INTERVAL_MS" --heartbeat 200 --timeout 3000 \
        --tls-cert /usr/share/remusd/tls/primary.pem --tls-key /usr/share/remusd/tls/primary.key --tls-ca /usr/share/remusd/tls/ca.pem --tls-peer-name backup 2>&1 | stamp > /tmp/protect.log &
    # Protected once the status socket says so (or the log reports the first checkpoint); the
    # first synchronisation copies all 128 MiB, slow under TCG.
    protected=""; deadline=$(( ${t_protect%.*} + 300 ))
    while [ "$(now_s)" -lt $deadline ]; do
        if timeout 10 remusd status 2>/dev/null | grep -q "state: PROTECTED" || grep -q "protecting: first checkpoint" /tmp/protect.log; then
            protected=$(since "$t_protect"); break
        fi
        [ -n "$(pids_matching "*remusd protect *")" ] || break
        sleep 1
    done
    if [ -z "$protected" ]; then
        if [ -n "$(pids_matching "*remusd protect *")" ]; then
            fail "remusd protect did not reach PROTECTED within 300 s"; timeout 10 remusd status 2>&1 | sed 's/^/    | /'
        else
            why=$(grep -a -m1 -iE "error|fail" /tmp/protect.log || grep -av '^ *$' /tmp/protect.log | tail -1)
            fail "remusd protect exited before the guest was protected: $(echo "$why" | cut -d' ' -f2-)"
        fi
        show /tmp/protect.log
        kill_me
    fi
    metric remusd_sync_s "$protected"
    pass "remusd protects the guest towards host B (PROTECTED after $protected s)"

    ca=$(last_counter "$log"); ta=$(now)
    # A line every 10 s: if host A stalls, its console shows from when.
    shown=""
    end=$(( ${ta%.*} + REMUS_SECONDS ))
    while [ "$(now_s)" -lt $end ]; do
        left=$(( end - $(now_s) )); sleep $(( left < 10 ? left : 10 ))
        st=$(timeout 10 remusd status 2>&1)
        info "protected $(since "$ta") s: $(echo "$st" | grep -E '^(state|epoch):' | paste -sd ';' | grep . || echo 'no status'); guest counter $(last_counter "$log")"
        # remusd's own account, once, when protection is no longer what it was.
        if [ -z "$shown" ] && ! echo "$st" | grep -q "state: PROTECTED"; then shown=1; show /tmp/protect.log; fi
    done
    cb=$(last_counter "$log"); tb=$(now)
    timeout 10 remusd status > /tmp/status.txt 2>&1
    if [ -z "$(pids_matching "*remusd protect *")" ]; then
        fail "remusd protect exited while protecting"; show /tmp/protect.log; kill_me
    fi
    held=$(diff_s "$ta" "$tb")
    metric protected_s "$held"
    metric counter_rate_protected "$(awk -v a="$ca" -v b="$cb" -v s="$held" 'BEGIN { printf "%.2f", (b - a) / s }')"
    # What the primary's status socket reports (lines as PrimaryStatistics.render writes them).
    sed 's/^/    | /' /tmp/status.txt
    awk '
        /^epoch: captured/ { gsub(/,/, ""); print "TESTBED METRIC checkpoints_acknowledged " $5 }
        /^pause: p50/ { print "TESTBED METRIC pause_p50_us " $3; print "TESTBED METRIC pause_p99_us " $6 }
        /^checkpoint size: p50/ { print "TESTBED METRIC pages_per_checkpoint_p50 " $4 }
        /^checkpoint rate:/ { print "TESTBED METRIC checkpoints_per_s " $3 }
        /^shipped:/ { print "TESTBED METRIC shipped_bytes " $2 }
        /^output buffer:/ { print "TESTBED METRIC output_dropped " $8 }' /tmp/status.txt
    if grep -q "state: PROTECTED" /tmp/status.txt; then
        pass "the guest stayed protected for $held s ($(grep '^epoch:' /tmp/status.txt))"
    else
        fail "after $held s the primary is $(grep '^state:' /tmp/status.txt || echo 'not answering status')"
    fi
    kill_me
}

# --- Host B: remusd receive; watches the guest on host A until host A is gone; checks failover -
backup() {
    hostname host-b
    xen_services || exit 0
    bridge_up "$host_b" || exit 0
    # The fence is trivially "true": the only way this run loses host A is two-hosts.sh killing
    # host A's whole QEMU, so once remusd notices the loss, host A is off. (Should remusd take
    # over while host A merely stalls, two-hosts.sh fails the run: host A was not killed.)
    remusd receive --listen "0.0.0.0:$port" --timeout 3000 --heartbeat 200 --fence "true" \
        --tls-cert /usr/share/remusd/tls/backup.pem --tls-key /usr/share/remusd/tls/backup.key --tls-ca /usr/share/remusd/tls/ca.pem --tls-allow-peer primary --xen-allow-path /guest 2>&1 | stamp > /tmp/receive.log &
    deadline=$(( $(now_s) + 20 ))
    until ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; do
        [ "$(now_s)" -lt $deadline ] && [ -n "$(pids_matching "*remusd receive *")" ] || break
        sleep 1
    done
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        pass "remusd receive listens on $port"
    else
        fail "remusd receive does not listen on $port"; show /tmp/receive.log
    fi
    wait_for_peer "$host_a" "host A" || exit 0

    # Watch the guest once a second, each answer with its time, until host A is lost: the guest
    # and host A's dom0 both silent for 3 polls in a row (the guest alone may pause for a
    # checkpoint), or remusd reporting that it took over. Host A needs its boot, the guest,
    # remusd's first synchronisation (up to 300 s) and REMUS_SECONDS of protection.
    # Each probe waits up to 3 s for the answer: while remusd holds the guest's output per epoch,
    # the SYN-ACK and the answer each wait for an ACK across the two hosts, over a second at
    # times, and dom0-lib's 1 s probe then took a running guest for a silent one.
    : > /tmp/answers.txt
    seen=""; connected=""; silent=""; said=""; misses=0; last_ok=""; last_val=""
    deadline=$(( $(now_s) + 420 + REMUS_SECONDS ))
    while [ "$(now_s)" -lt $deadline ]; do
        t=$(now); a=$(timeout 5 busybox nc -w 3 "$guest_ip" 7 < /dev/null 2>/dev/null | sed -n 's/^COUNTER \([0-9]*\).*/\1/p' | head -1)
        echo "$t ${a:--}" >> /tmp/answers.txt
        if [ -n "$a" ]; then
            misses=0; silent=""; said=""; last_ok=$t; last_val=$a
            if [ -z "$seen" ]; then
                seen=$t
                pass "host B reaches the guest on host A over TCP (counter $a)"
                if busybox ping -c 3 -W 2 "$guest_ip" > /tmp/ping-guest.txt 2>&1; then
                    pass "host B pings the guest on host A"
                else
                    fail "host B does not ping the guest on host A"; show /tmp/ping-guest.txt
                fi
            fi
            sleep 1
        elif [ -n "$seen" ]; then
            [ -n "$silent" ] || silent=$t
            if busybox ping -c 1 -W 1 "$host_a" > /dev/null 2>&1; then misses=0; else misses=$((misses + 1)); fi
            [ $misses -lt 3 ] || break
            if [ -z "$said" ] && [ $misses -eq 0 ] && [ "$(diff_s "$silent" "$(now)" | cut -d. -f1)" -ge 5 ]; then
                said=1; info "the guest on host A has not answered for $(since "$silent") s; host A's dom0 answers ping"
            fi
        else
            sleep 1
        fi
        if [ -z "$connected" ] && grep -q "primary .* connected" /tmp/receive.log; then
            connected=$(now); info "remusd receive: $(grep -m1 "primary .* connected" /tmp/receive.log | cut -d' ' -f2-)"
        fi
        grep -q "ACTIVATED" /tmp/receive.log && { silent=${silent:-$t}; break; }
    done
    if [ -z "$seen" ]; then
        fail "the guest on host A never answered host B"; show /tmp/receive.log; exit 0
    fi
    if [ -z "$silent" ]; then
        fail "host A was not lost within $((420 + REMUS_SECONDS)) s of host B starting to watch (last counter $last_val)"
        show /tmp/receive.log; exit 0
    fi
    metric counter_before_loss "$last_val"
    if [ $misses -ge 3 ]; then why="host A's dom0 missed $misses pings in a row"; else why="remusd receive ACTIVATED while host A's dom0 still answered ping"; fi
    info "host A lost at uptime $(now): the guest silent since $silent (last answer: counter $last_val at $last_ok); $why"

    # Failover: remusd notices the loss (--timeout 3000), fences (true) and activates the last
    # committed checkpoint here. Without a primary ever connected there is nothing to take over.
    # Connected: the receive log said so, or its status names a primary.
    [ -n "$connected" ] || ! timeout 10 remusd status 2>/dev/null | grep -q "^primary:" || connected=$(now)
    if [ -n "$connected" ]; then window=120; else window=20; info "no primary ever connected to remusd receive: nothing to take over"; fi
    answer=""; t_answer=""; running=""
    deadline=$(( $(now_s) + window ))
    while [ "$(now_s)" -lt $deadline ]; do
        t=$(now); a=$(ask_counter)
        echo "$t ${a:--}" >> /tmp/answers.txt
        if [ -n "$a" ]; then answer=$a; t_answer=$t; break; fi
        if [ -z "$running" ]; then
            case "$(domain_state guest)" in ""|*p*) ;; *) running=$(now) ;; esac
        fi
        # Nothing will start the guest here once remusd receive is gone (and it said why).
        [ -n "$running" ] || [ -n "$(pids_matching "*remusd receive *")" ] || { info "remusd receive exited"; break; }
        sleep 0.3   # an unreachable guest can fail at once
    done
    noticed=$(stamp_of /tmp/receive.log "primary lost")
    activated=$(stamp_of /tmp/receive.log "ACTIVATED")
    [ -n "$noticed" ] && metric failover_lost_s "$(diff_s "$silent" "$noticed")"
    [ -n "$activated" ] && metric failover_activated_s "$(diff_s "$silent" "$activated")"
    [ -n "$running" ] && metric failover_running_s "$(diff_s "$silent" "$running")"
    if [ -n "$noticed" ]; then info "remusd receive: $(grep -m1 "primary lost" /tmp/receive.log | cut -d' ' -f2-)"; fi
    if [ -n "$activated" ]; then info "remusd receive: $(grep -m1 "ACTIVATED" /tmp/receive.log | cut -d' ' -f2-)"; fi

    if [ -z "$answer" ]; then
        metric counter_went_back "$(went_back)"
        fail "the guest does not answer on host B within $window s of host A's loss (remusd noticed the loss: ${noticed:+yes}${noticed:-no}, activated: ${activated:+yes}${activated:-no}, domain running here: ${running:+yes}${running:-no})"
        timeout 20 xl list
        show /tmp/receive.log
        for f in "$console_dir"/*.log; do [ -e "$f" ] && show "$f"; done
        exit 0
    fi
    metric failover_answer_s "$(diff_s "${noticed:-$silent}" "$t_answer")"
    metric outage_s "$(diff_s "$last_ok" "$t_answer")"
    metric counter_after_failover "$answer"
    slack=$(( (INTERVAL_MS + 999) / 1000 ))
    pass "failover: the guest answers TCP on host B $(diff_s "${noticed:-$silent}" "$t_answer") s after the loss was noticed (clients saw no answer for $(diff_s "$last_ok" "$t_answer") s)"
    if busybox ping -c 3 -W 2 "$guest_ip" > /tmp/ping-after.txt 2>&1; then pass "the guest answers ping after failover"; else fail "the guest does not answer ping after failover"; show /tmp/ping-after.txt; fi
    state=$(domain_state guest)
    if [ -n "$state" ]; then info "domain guest on host B: $state"; else fail "no domain named guest on host B"; timeout 20 xl list; fi
    if [ "$answer" -ge 1 ] && [ "$((answer + slack))" -ge "$last_val" ]; then
        pass "the guest continued on host B without a reboot (counter $last_val before the loss, $answer after)"
    else
        fail "counter after failover is $answer, before the loss $last_val: the guest restarted or lost state"
    fi
    sleep 5
    later=$(ask_counter)
    echo "$(now) ${later:--}" >> /tmp/answers.txt
    if [ -n "$later" ] && [ "$later" -gt "$answer" ]; then pass "the counter keeps running on host B ($answer -> $later in 5 s)"; else fail "the counter does not advance on host B (${later:-no answer})"; fi
    # Output commit: no answer the guest gave can be undone, so the answered counter may step back
    # by at most the uncommitted window (one checkpoint interval, in the guest's 1/s steps).
    back=$(went_back)
    metric counter_went_back "$back"
    if [ "$back" -le "$slack" ]; then
        pass "the counter answered over TCP never went back more than the uncommitted window (at most $back, window $slack)"
    else
        fail "the counter answered over TCP went back by $back (more than the uncommitted window, $slack): output was released before it was committed"
        show /tmp/answers.txt
    fi
    show /tmp/receive.log
}

case "$role" in
    primary) primary ;;
    backup) backup ;;
    *) fail "host-role.sh: unknown role '$role' (primary or backup)" ;;
esac
