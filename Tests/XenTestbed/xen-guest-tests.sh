#!/bin/sh
# Runs in the testbed's dom0 once per guest kind (xen-tests.sh): the guest, and the baseline:
# Xen's own `xl remus -F -n` (no network buffering: unsafe) protecting the guest towards `xl
# migrate-receive -r -e` on this same dom0, then the sending side killed; then remusd protecting
# the same guest towards a backup on this dom0: output held, failover after a kill and after a
# destroyed primary, a lost backup coming back, planned stops, switchover.
#
#   sh /xen-guest-tests.sh pvh|hvm|pv
#
# Console lines as xen-tests.sh's, each verdict prefixed with the kind.
. /xen-testbed.conf   # REMUS_SECONDS INTERVAL_MS XL_BASELINE
testbed_kind=$1
. /dom0-lib.sh
# The guest's answer after a failover ($answer) continues its counter from before the kill
# ($counter_before), less at most $1 (the uncommitted window): no reboot, no lost state.
check_continued() {
    if [ "$answer" -ge 1 ] && [ "$((answer + $1))" -ge "$counter_before" ]; then
        pass "the guest continued on the backup without a reboot (counter $counter_before before the kill, $answer after)"
    else
        fail "counter after failover is $answer, before the kill $counter_before: the guest restarted or lost state"
    fi
}
# State column of `xl list` for a domain id ("r-----", "--p---", …; empty if it does not exist).
domain_state() { timeout 20 xl list 2>/dev/null | awk -v id="$1" '$2 == id { print $5 }'; }

# --- 3. The guest -------------------------------------------------------------------------
# The guest's counter lines over UDP: what the outside world receives from it.
socat -u UDP-RECV:9000 STDOUT > /tmp/udp-xl.log 2>/dev/null &
udp_listener=$!
start_guest "" || { cleanup_domains; exit 0; }
primary_id=$(xl domid guest)
primary_log=$guest_log
if busybox ping -c 3 -W 2 10.0.0.2 > /tmp/ping.txt 2>&1; then pass "guest answers ping"; else fail "guest does not answer ping"; show /tmp/ping.txt "$primary_log"; fi
answer=$(ask_counter)
if [ -n "$answer" ]; then pass "guest answers TCP on port 7 (counter $answer)"; else fail "guest does not answer TCP on port 7"; fi

measure_free_rate "$primary_log"

# Sections 4-6; returns early (after a FAIL line) when xl remus takes no checkpoint or exits,
# and remusd's sections run all the same.
xl_remus_baseline() {
# --- 4. xl remus: checkpoints and guest speed while protected --------------------------------
info "xl remus -F -n -i $INTERVAL_MS -s \"\" guest \"xl migrate-receive -r -e\" for ${REMUS_SECONDS} s"
t_remus=$(now)
xl remus -F -n -i "$INTERVAL_MS" -s "" guest "xl migrate-receive -r -e" 2>&1 | stamp > /tmp/remus.log &
# libxenguest reports "Domain now suspended" once per suspension (at xl's default verbosity;
# -vvv would cost dom0 more CPU than the checkpoints): the first ends the live pre-copy, every
# later one is a checkpoint. "Checkpointed save: N/N" after it counts the pages sent.
deadline=$(( ${t_remus%.*} + 240 ))
while ! grep -q "Domain now suspended" /tmp/remus.log; do
    [ "$(now | cut -d. -f1)" -lt $deadline ] || break
    sleep 1
done
if ! grep -q "Domain now suspended" /tmp/remus.log; then
    fail "xl remus took no checkpoint within 240 s"; show /tmp/remus.log; diagnose; return 1
fi
metric remus_sync_s "$(awk -v a="$t_remus" '/Domain now suspended/ { printf "%.2f", $1 - a; exit }' /tmp/remus.log)"
backup_id=$(xl domid guest--incoming 2>/dev/null)
info "primary domain $primary_id, backup domain ${backup_id:-?} ($(domain_state "$backup_id"))"

ca=$(grep -c "Domain now suspended" /tmp/remus.log); va=$(last_counter "$primary_log"); ta=$(now)
sleep "$REMUS_SECONDS"
cb=$(grep -c "Domain now suspended" /tmp/remus.log); vb=$(last_counter "$primary_log"); tb=$(now)
crashed=$(crashed_domains)
if [ -n "$crashed" ]; then
    fail "the guest crashed while xl remus protected it (domain $crashed); xl's failover is not measured"; show /tmp/remus.log; diagnose; return 1
fi
if [ -z "$(pids_matching "*xl remus *")" ]; then
    fail "xl remus exited while protecting"; show /tmp/remus.log; diagnose; return 1
fi
protected=$(awk -v a="$ta" -v b="$tb" 'BEGIN { printf "%.1f", b - a }')
metric protected_s "$protected"
metric checkpoints "$((cb - ca))"
metric checkpoints_per_s "$(awk -v n="$((cb - ca))" -v s="$protected" 'BEGIN { printf "%.2f", n / s }')"
metric counter_rate_protected "$(awk -v a="$va" -v b="$vb" -v s="$protected" 'BEGIN { printf "%.2f", (b - a) / s }')"
# Per checkpoint: the gap between consecutive suspensions and the pages sent.
awk -v from="$ta" -v to="$tb" '
    $1 < from || $1 > to { next }
    /Domain now suspended/ {
        if (last) { gap = $1 - last; gaps += gap; ngap++; if (gap > maxgap) maxgap = gap }
        last = $1
    }
    /Checkpointed save: / && $NF == "100%" { split($(NF - 1), p, "/"); pages += p[2]; npages++ }
    END {
        if (ngap) printf "TESTBED METRIC checkpoint_gap_ms %.0f\nTESTBED METRIC checkpoint_gap_max_ms %.0f\n", 1000 * gaps / ngap, 1000 * maxgap
        if (npages) printf "TESTBED METRIC pages_per_checkpoint %.0f\n", pages / npages
    }' /tmp/remus.log
if [ "$((cb - ca))" -gt 0 ]; then pass "xl remus checkpoints while the guest runs ($((cb - ca)) in $protected s)"; else fail "no checkpoints while protected"; fi

# --- 5. Failover: kill the sending side, the primary host "dies" ---------------------------
sender=$(pids_matching "*xl remus *")
helper=$(pids_matching "*libxl-save-helper --save-domain*")
counter_before=$(last_counter "$primary_log")
t_kill=$(now)
kill -9 $sender $helper 2>/dev/null
xl destroy "$primary_id" > /tmp/destroy.log 2>&1 &   # the primary host is gone with its guest
destroyer=$!
info "killed xl remus ($sender) and its save helper ($helper) at counter $counter_before; destroying domain $primary_id"
noticed=""; running=""; answered=""; answer=""
deadline=$(( ${t_kill%.*} + 90 ))
while [ "$(now | cut -d. -f1)" -lt $deadline ]; do
    if [ -z "$noticed" ] && grep -q "Failover" /tmp/remus.log; then
        noticed=$(awk -v a="$t_kill" '/Failover/ { printf "%.2f", $1 - a; exit }' /tmp/remus.log)
    fi
    if [ -z "$running" ]; then
        state=$(domain_state "$backup_id")
        case "$state" in ?-p*|"") ;; *) running=$(since "$t_kill") ;; esac
    fi
    answer=$(ask_counter)
    if [ -n "$answer" ]; then answered=$(since "$t_kill"); break; fi
done
wait "$destroyer"
# libxenguest on the receiving side sees the stream end and restores the last checkpoint; libxl
# then finishes the domain (xenstore, devices, hotplug scripts) before xl reports the failover.
broke=$(awk -v a="$t_kill" '$1 >= a && /Failed to read|Restore failed/ { printf "%.2f", $1 - a; exit }' /tmp/remus.log)
[ -n "$broke" ] && metric failover_stream_broken_s "$broke"
[ -n "$noticed" ] && metric failover_noticed_s "$noticed"
[ -n "$running" ] && metric failover_running_s "$running"
if [ -n "$answered" ]; then
    metric failover_answer_s "$answered"
    metric counter_before_kill "$counter_before"
    metric counter_after_failover "$answer"
    pass "failover: the backup answers $answered s after the kill (stream break seen after ${broke:-?} s, failover reported after ${noticed:-?} s, unpaused after ${running:-?} s)"
    check_continued 5   # no output buffering: the backup may be several checkpoints behind
    sleep 5
    later=$(ask_counter)
    if [ -n "$later" ] && [ "$later" -gt "$answer" ]; then pass "the counter keeps running on the backup ($answer -> $later in 5 s)"; else fail "the counter does not advance on the backup (${later:-no answer})"; fi
    # Output the primary had emitted that the backup emits again: it came from state the
    # backup never held (no output buffering with -n). The guest prints each value once per
    # life, so a value seen twice in any console log (the backup's log may be the primary's
    # file, reopened after the rename to "guest") was emitted twice.
    info "console logs: $(cd "$console_dir" && ls guest-*.log | tr '\n' ' ')"
    repeated=$(cat "$console_dir"/guest-*.log | grep -ao 'COUNTER [0-9]* ' | sort | uniq -d | wc -l)
    metric counter_repeated "$repeated"
    # The same over the network: counter lines dom0 received twice over UDP.
    metric udp_repeated "$(grep -ao 'COUNTER [0-9]* ' /tmp/udp-xl.log | sort | uniq -d | wc -l)"
else
    fail "no answer from the guest within 90 s of the kill (receiver noticed: ${noticed:-no}, backup unpaused: ${running:-no})"
    diagnose
fi
show /tmp/remus.log
timeout 20 xl list

# --- 6. Xen's safe mode (with network buffering) on Debian ----------------------------------
# Debian's libxenlight is built without libnl: expected to refuse. Last, because a refused
# attempt can leave the guest suspended and a paused guest--incoming behind.
timeout 120 xl remus -i "$INTERVAL_MS" -s "" guest "xl migrate-receive -r -e" > /tmp/remus-safe.log 2>&1
rc=$?
if grep -q "No support for network buffering" /tmp/remus-safe.log; then
    pass "xl remus with network buffering (safe mode) is refused on Debian: $(grep -o 'Remus: No support for network buffering' /tmp/remus-safe.log | head -1) (exit $rc)"
else
    info "xl remus with network buffering exited $rc without the expected refusal"; show /tmp/remus-safe.log
fi
}
if [ "${XL_BASELINE:-1}" = 1 ]; then
    xl_remus_baseline
    # Nothing of xl's run may reach remusd's: its receiver, save helpers, domains.
    for p in $(pids_matching "xl *") $(pids_matching "*libxl-save-helper*"); do kill -9 "$p" 2>/dev/null; done
fi
kill "$udp_listener" 2>/dev/null
cleanup_domains
wait_no_domains 60 || fail "domains left after xl's run: $(xl list | awk 'NR > 2 { print $1 }' | tr '\n' ' ')"

# --- 7. remusd protects the guest: backup on this same dom0, plug qdiscs on the vif ----------
# The backup fences the primary by destroying it; gone already, or dying, counts as fenced (a
# dying domain never runs again; it may linger while dom0 still holds its pages).
cat > /usr/local/bin/fence-guest <<'FENCE'
#!/bin/sh
xl destroy guest > /dev/null 2>&1
state=$(xl list guest 2>/dev/null | awk 'NR == 2 { print $5 }')
case "$state" in ""|*d*) exit 0 ;; *) echo "guest is still $state"; exit 1 ;; esac
FENCE
chmod +x /usr/local/bin/fence-guest
# Under TCG, on a machine other work shares, a guest can take seconds to suspend and the primary
# sends no heartbeat meanwhile: the backup's silence timeout is 10 s here (every failover below
# is noticed at once anyway: a closed connection or STREAM_END; two-hosts.sh measures the timeout
# on a host loss), and `xl destroy` as the fence may take well over the default 5 s.
timing="--interval $INTERVAL_MS --heartbeat 200 --timeout 10000"
fencing="--fence fence-guest --fence-timeout 60000"
# The TLS handshake of dom0's userspace TLS can take seconds under TCG on a loaded host: the
# primary's first connection gets 20 s (--connect-timeout) instead of 3.
# remusd's log lines carry no uptime: stamp them.
# The replication channel: mutual TLS, or with $2 = plain the loopback plaintext that xl remus
# uses here (-s ""), so that the first sync compares transport for transport.
receive_channel() { if [ "$1" = plain ]; then echo --insecure-plaintext; else echo --tls-cert /usr/share/remusd/tls/backup.pem --tls-key /usr/share/remusd/tls/backup.key --tls-ca /usr/share/remusd/tls/ca.pem --tls-allow-peer primary; fi; }
protect_channel() { if [ "$1" = plain ]; then echo --insecure-plaintext; else echo --tls-cert /usr/share/remusd/tls/primary.pem --tls-key /usr/share/remusd/tls/primary.key --tls-ca /usr/share/remusd/tls/ca.pem --tls-peer-name backup; fi; }
start_receive() {
    remusd receive --listen 127.0.0.1:7788 $timing $fencing $(receive_channel "$2") --xen-allow-path /guest 2>&1 | stamp > "$1" &
}
start_protect() {
    remusd protect guest 127.0.0.1:7788 --backend xen $timing --connect-timeout 20000 $(protect_channel "$2") $3 2>&1 | stamp > "$1" &
}
# Waits until a log shows a line matching $2, at most $3 seconds; prints the uptime it did.
wait_for_line() {
    deadline=$(( $(now | cut -d. -f1) + $3 ))
    while [ "$(now | cut -d. -f1)" -lt $deadline ]; do
        line=$(grep -a -m1 "$2" "$1" 2>/dev/null) && { echo "${line%% *}"; return 0; }
        sleep 1
    done
    return 1
}
status_field() { timeout 10 remusd status --socket /run/remusd/guest.sock 2>/dev/null | sed -n "s/^$1: //p" | head -1; }
pid_of() { pids_matching "$1" | head -1; }
start_udp() { socat -u UDP-RECV:9000 STDOUT > "$1" 2>/dev/null & udp_listener=$!; }
# Counter values dom0 received over UDP more than once.
udp_repeats() { grep -ao 'COUNTER [0-9]* ' "$1" | sort | uniq -d | wc -l; }
# The largest step back of the guest's uptime between consecutive lines received (0: none).
uptime_back() { grep -ao 'up=[0-9.]*' "$1" | cut -d= -f2 | awk 'NR > 1 && p - $1 > m { m = p - $1 } { p = $1 } END { printf "%.2f", m + 0 }'; }
# The largest gap of the guest's uptime between consecutive lines received.
# The same over the first $2 lines only (all when not given).
uptime_gap() { grep -ao 'up=[0-9.]*' "$1" | head -n "${2:-999999}" | cut -d= -f2 | awk 'NR > 1 && $1 - p > m { m = $1 - p } { p = $1 } END { printf "%.2f", m + 0 }'; }

# Asks the guest for its counter until it answers, at most $2 s after $1 (an uptime); sets
# $answer and $answered (seconds after $1), both empty when it never answered.
await_answer() {
    answered=""; answer=""
    deadline=$(( ${1%.*} + $2 ))
    while [ "$(now | cut -d. -f1)" -lt $deadline ]; do
        answer=$(ask_counter)
        if [ -n "$answer" ]; then answered=$(since "$1"); return 0; fi
        sleep 0.2
    done
    return 1
}

# A guest Xen holds as crashed ends remusd's sections here: a FAIL saying it $1 (the logs $2… shown),
# the diagnosis, no domain left. Returns when none crashed.
end_if_crashed() {
    crashed=$(crashed_domains)
    [ -n "$crashed" ] || return 0
    what=$1; shift
    fail "the guest $what (domain $crashed): the sections after it are left out"
    [ $# -eq 0 ] || show "$@"
    diagnose; cleanup_domains; exit 0
}
# Prints the first synchronisation of a primary's log ($1, started at uptime $2) as info lines,
# each with its time since the start, and sets $live_s: the start to the end of the live
# phase (libxenguest then suspends the guest), the moment xl's "Domain now suspended" marks.
sync_timeline() {
    live_s=$(awk -v a="$2" '/live phase shipped/ { printf "%.2f", $1 - a; exit }' "$1")
    # Every line up to the first checkpoint's ACK: what the start-up spends before the sync.
    awk '{ print } /first checkpoint [0-9]* acknowledged/ { exit }' "$1" | head -20 |
        awk -v a="$2" '{ t = $1; $1 = ""; sub(/^ +/, ""); sub(/^[^ ]+ [^ ]+ /, ""); printf "%7.2f s %s\n", t - a, substr($0, 1, 220) }' |
        while IFS= read -r line; do info "  $line"; done
    # The progress bar's "about N s left" at each quarter against the time the round took.
    eta_error_pct=$(awk '/synchronising: .* 100 %/ { print $1; exit }' "$1" | {
        read -r done_at || exit 0
        grep -a "synchronising: .* left" "$1" | sed -n 's/^\([0-9.]*\) .* \([0-9]*\) % .*about \([0-9.]*\) s left.*/\1 \2 \3/p' |
            awk -v d="$done_at" '{ took = d - $1; e = took > 0 ? 100 * ($3 - took) / took : 0; if (e < 0) e = -e; if (e > m) m = e
                printf "ETA at %s %%: said %s s, took %.2f s (%.0f %% off)\n", $2, $3, took, e > "/dev/stderr" } END { printf "%.0f", m }'
    } 2> /tmp/eta.txt)
    while IFS= read -r line; do info "  $line"; done < /tmp/eta.txt
}
# Starts a UDP listener, a backup and a primary for one test (logs /tmp/*-$1.log; $2 = plain
# for the plaintext channel); returns once the first checkpoint is committed, with its time
# from the start of protect in $afresh_sync_s, 1 after a FAIL line if none came within 300 s.
protect_afresh() {
    end_if_crashed "had crashed before the $1 test"
    start_udp /tmp/udp-$1.log
    start_receive /tmp/receive-$1.log "$2"
    wait_for_line /tmp/receive-$1.log "listening" 30 > /dev/null
    local t0; t0=$(now)
    start_protect /tmp/protect-$1.log "$2"
    if at=$(wait_for_line /tmp/protect-$1.log "protecting: first checkpoint" 300); then
        afresh_sync_s=$(awk -v a="$t0" -v b="$at" 'BEGIN { printf "%.2f", b - a }')
        wait_for_line /tmp/protect-$1.log "first checkpoint [0-9]* acknowledged" 60 > /dev/null
        sync_timeline /tmp/protect-$1.log "$t0"
        afresh_live_s=$live_s
        return 0
    fi
    fail "protection for the $1 test took no checkpoint"; show /tmp/protect-$1.log /tmp/receive-$1.log; diagnose
    return 1
}
# PASS if no counter line reached dom0 twice over UDP ($1) and enough arrived to tell ($2: across what).
check_no_repeats() {
    dups=$(udp_repeats "$1"); received=$(grep -ao 'COUNTER [0-9]*' "$1" | wc -l)
    if [ "$dups" -eq 0 ] && [ "$received" -gt 5 ]; then
        pass "no counter line reached dom0 twice over the network across $2 ($received received)"
    else
        fail "$dups of $received counter lines reached dom0 twice across $2 (output escaped before its checkpoint was committed), or too few arrived to tell"
    fi
}
# Waits until no process matches $1, at most $2 s; true when none is left.
wait_gone() { deadline=$(( $(now | cut -d. -f1) + $2 )); while [ -n "$(pid_of "$1")" ] && [ "$(now | cut -d. -f1)" -lt $deadline ]; do sleep 1; done; [ -z "$(pid_of "$1")" ]; }
# Ends every remusd and the UDP listener of a test.
end_test() {
    kill "$udp_listener" 2>/dev/null
    for p in $(pids_matching "remusd *"); do kill "$p" 2>/dev/null; done
    wait_gone "remusd *" 30
}

start_udp /tmp/udp-remusd.log
t=$(now)
if ! xl create /etc/xen/guest.cfg > /tmp/xl-create2.log 2>&1; then
    fail "xl create guest for remusd"; show /tmp/xl-create2.log; diagnose; exit 0
fi
primary_id=$(xl domid guest)
primary_log=$console_dir/guest-guest.log
deadline=$(( ${t%.*} + guest_boot_s ))
until [ -n "$(ask_counter)" ] || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
rtt_free=$(busybox ping -c 5 -W 2 10.0.0.2 2>/dev/null | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')

start_receive /tmp/receive.log "$MAIN_CHANNEL"
wait_for_line /tmp/receive.log "listening" 30 > /dev/null || { fail "remusd receive did not start"; show /tmp/receive.log; diagnose; exit 0; }
t_protect=$(now)
[ "$MAIN_CHANNEL" = tls ] && [ -z "$MAIN_EXTRA" ] || info "remusd's main protection: channel $MAIN_CHANNEL, more arguments: ${MAIN_EXTRA:-none}"
start_protect /tmp/protect.log "$MAIN_CHANNEL" "$MAIN_EXTRA"
if at=$(wait_for_line /tmp/protect.log "protecting: first checkpoint" 300); then
    sync_s=$(awk -v a="$t_protect" -v b="$at" 'BEGIN { printf "%.2f", b - a }')
    metric remusd_sync_s "$sync_s"
    wait_for_line /tmp/protect.log "first checkpoint [0-9]* acknowledged" 60 > /dev/null
    sync_timeline /tmp/protect.log "$t_protect"
    metric remusd_live_s "$live_s"
    metric remusd_eta_error_pct "${eta_error_pct:-none}"
    pass "remusd protect guest: first checkpoint committed after ${sync_s} s (live pre-copy by libxenguest through remusd's stream)"
else
    fail "remusd protect took no checkpoint within 300 s"; show /tmp/protect.log /tmp/receive.log; diagnose; cleanup_domains; exit 0
fi
info "vifs buffered: $(grep -ao 'output held by plug qdiscs on [^;]*' /tmp/protect.log | head -1)"

# Checkpoints and guest speed while protected, the same window as xl remus had.
e1=$(status_field epoch | sed 's/captured \([0-9]*\).*/\1/'); v1=$(last_counter "$primary_log"); t1=$(now)
sleep "$REMUS_SECONDS"
e2=$(status_field epoch | sed 's/captured \([0-9]*\).*/\1/'); v2=$(last_counter "$primary_log"); t2=$(now)
end_if_crashed "crashed while remusd protected it" /tmp/protect.log /tmp/receive.log
protected=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
metric remusd_protected_s "$protected"
if [ -n "$e1" ] && [ -n "$e2" ] && [ "$e2" -gt "$e1" ]; then
    metric remusd_checkpoints_per_s "$(awk -v n="$((e2 - e1))" -v s="$protected" 'BEGIN { printf "%.2f", n / s }')"
    pass "remusd checkpoints while the guest runs ($((e2 - e1)) in $protected s)"
else
    fail "remusd took no checkpoints while protected (epochs ${e1:-?} -> ${e2:-?})"; show /tmp/protect.log; diagnose
fi
metric remusd_counter_rate "$(awk -v a="$v1" -v b="$v2" -v s="$protected" 'BEGIN { printf "%.2f", (b - a) / s }')"
pause=$(status_field pause)
info "remusd status: pause ${pause:-?}; $(status_field 'checkpoint size'); $(status_field 'output buffer')"
split=$(status_field 'pause split')
info "remusd pause split: $split"
metric remusd_pause_split "$(echo "$split" | sed -n 's/.*suspend p50 \([0-9]*\) .*capture p50 \([0-9]*\) .*resume p50 \([0-9]*\) .*/\1 \2 \3/p' | awk '{ printf "%.1f/%.1f/%.1f", $1 / 1000, $2 / 1000, $3 / 1000 }')"
metric remusd_pause_p50_ms "$(echo "$pause" | sed -n 's/p50 \([0-9]*\) µs.*/\1/p' | awk '{ printf "%.1f", $1 / 1000 }')"
metric remusd_pause_p99_ms "$(echo "$pause" | sed -n 's/.*p99 \([0-9]*\) µs.*/\1/p' | awk '{ printf "%.1f", $1 / 1000 }')"
# Output buffering: replies leave only when the epoch they belong to is acknowledged, so a
# ping's round trip grows from ~1 ms to a good part of an epoch.
rtt_held=$(busybox ping -c 10 -W 5 10.0.0.2 2>/dev/null | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
metric remusd_ping_rtt_ms "${rtt_held:-none}"
metric free_ping_rtt_ms "${rtt_free:-none}"
if [ -n "$rtt_held" ] && awk -v h="$rtt_held" -v f="${rtt_free:-0}" -v i="$INTERVAL_MS" 'BEGIN { exit !(h > f + i / 4) }'; then
    pass "output held per epoch: ping round trip ${rtt_held} ms protected vs ${rtt_free:-?} ms before (interval $INTERVAL_MS ms)"
else
    fail "output does not look held: ping round trip ${rtt_held:-none} ms protected vs ${rtt_free:-?} ms before"
    tc -s qdisc show 2>&1 | head -20
fi

# --- 8. Failover: the primary domain paused and remusd SIGKILLed ---------------------------
protect_pid=$(pid_of "remusd protect *")
counter_before=$(last_counter "$primary_log")
lines_before_kill=$(grep -ac 'up=' /tmp/udp-remusd.log)
t_kill=$(now)
xl pause guest
kill -9 "$protect_pid"
info "paused domain $primary_id and SIGKILLed remusd protect ($protect_pid) at counter $counter_before"
await_answer "$t_kill" 120
if at=$(wait_for_line /tmp/receive.log "ACTIVATED" 5); then metric remusd_failover_activated_s "$(awk -v a="$t_kill" -v b="$at" 'BEGIN { printf "%.2f", b - a }')"; fi
# Where the failover's time went, from the backup's log (seconds after the kill).
info "backup after the kill: $(awk -v a="$t_kill" '$1 >= a { $1 = sprintf("+%.1fs", $1 - a); print }' /tmp/receive.log | grep -E 'lost|fenc|ACTIVAT|activat|xen:' | head -8 | tr '\n' '|' | cut -c1-1200)"
if [ -n "$answered" ]; then
    metric remusd_failover_answer_s "$answered"
    pass "failover after a kill: the backup answers $answered s after it (the closed connection, then the fence)"
    check_continued 2
    busybox ping -c 2 -W 2 10.0.0.2 > /dev/null 2>&1 && pass "the guest answers ping after failover" || fail "no ping answer after failover"
    state=$(xl list 2>/dev/null | awk '$1 == "guest" { print $5 }')
    [ -n "$state" ] && pass "the backup runs as 'guest' ($state); left: $(xl list | awk 'NR > 2 { print $1 }' | tr '\n' ' ')" || fail "no domain named guest after failover: $(xl list | awk 'NR > 1 { print $1 }' | tr '\n' ' ')"
else
    fail "no answer from the guest within 120 s of the kill"; show /tmp/receive.log; diagnose
fi
sleep 5
later=$(ask_counter)
[ -n "$later" ] && [ -n "$answer" ] && [ "$later" -gt "$answer" ] && pass "the counter keeps running on the backup ($answer -> $later in 5 s)" || fail "the counter does not advance after failover (${answer:-?} -> ${later:-?})"
metric remusd_udp_repeated "$(udp_repeats /tmp/udp-remusd.log)"
check_no_repeats /tmp/udp-remusd.log "the failover"
back=$(uptime_back /tmp/udp-remusd.log); gap=$(uptime_gap /tmp/udp-remusd.log)
metric remusd_clock_back_s "$back"; metric remusd_clock_gap_s "$gap"
# I4: the guest's clock continues from the checkpoint: never back, and forward by no more than
# the real time the failover took, plus the time from the last line before the kill to the kill
# and, when the guest's first line after the failover came after its first answer, the time from
# that answer to the line — each bounded by the largest gap between lines before the kill (the
# guest's own pace, slow when QEMU gets little CPU) — and the line's own second. (With one pace
# only, a calm CI-mode run failed by 0.2 s: gap 8.92 s, failover 4.95 s, pace 2.77 s.)
pace=$(uptime_gap /tmp/udp-remusd.log "$lines_before_kill")
metric remusd_clock_pace_s "$pace"
if awk -v b="$back" -v g="$gap" -v a="${answered:-0}" -v p="$pace" 'BEGIN { exit !(b == 0 && g <= a + 2 * p + 1) }'; then
    pass "the guest's clock never went back across the failover and jumped ahead by at most the downtime (largest gap between lines ${gap} s, failover ${answered:-?} s, lines before it at most ${pace} s apart)"
else
    fail "the guest's clock went back by $back s or jumped ${gap} s (failover took ${answered:-?} s, lines before it at most ${pace} s apart)"
fi

# --- 9. Planned stop, and protection again: nothing stale, the second run works -----------
kill "$(pid_of "remusd receive *")" 2>/dev/null
wait_gone "remusd receive *" 30 || kill -9 "$(pid_of "remusd receive *")"

# --- 9a. The first synchronisation, round after round: medians, not one sample --------------
# SYNC_ROUNDS rounds. In each, xl remus and remusd over plaintext (like xl's -s "") synchronise
# the running guest from the start, in an order that rotates from round to round (and, when
# the run was given an earlier build as remusd-before, that one too), each stopped after its
# first checkpoint. The moment both report is the end of the live pre-copy: xl's "Domain now
# suspended", remusd's "live phase shipped" (an earlier build: "first checkpoint taken", a
# little later). remusd also reports its first checkpoint's ACK, which xl has no equivalent of
# (it never waits for its backup).
# xl's round ends by killing its receiver: xl remus resumes the guest ("Backup failed?").
xl_sync_round() {
    local t0 deadline
    t0=$(now)
    xl remus -F -n -i "$INTERVAL_MS" -s "" guest "xl migrate-receive -r -e" 2>&1 | stamp > /tmp/sync-xl.log &
    deadline=$(( ${t0%.*} + 120 ))
    until grep -q "Domain now suspended" /tmp/sync-xl.log || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
    awk -v a="$t0" '/Domain now suspended/ { printf "%.2f\n", $1 - a; exit }' /tmp/sync-xl.log >> /tmp/sync-xl.txt
    [ "$round" != 1 ] || info "  round 1, xl's CPU by thread at the end of its live pre-copy: sender: xl $(thread_cpu 'xl remus *'), save helper $(thread_cpu '*libxl-save-helper --save*'); receiver: xl $(thread_cpu 'xl migrate-receive *'), restore helper $(thread_cpu '*libxl-save-helper --restore*')"
    for p in $(pids_matching "xl migrate-receive *"); do kill -9 "$p" 2>/dev/null; done
    deadline=$(( $(now | cut -d. -f1) + 60 ))
    while [ -n "$(pids_matching "xl remus *")" ] && [ "$(now | cut -d. -f1)" -lt $deadline ]; do sleep 1; done
    for p in $(pids_matching "xl remus *"); do kill -9 "$p" 2>/dev/null; done
    xl destroy guest--incoming 2>/dev/null
    grep -q "Domain now suspended" /tmp/sync-xl.log
}
# $1: the binary (remusd or remusd-before); appends to /tmp/sync-$1*.txt.
remusd_sync_round() {
    local bin=$1 t0 at ack
    $bin receive --listen 127.0.0.1:7788 $timing $fencing --insecure-plaintext --xen-allow-path /guest 2>&1 | stamp > /tmp/sync-receive.log &
    wait_for_line /tmp/sync-receive.log "listening" 30 > /dev/null || return 1
    t0=$(now)
    $bin protect guest 127.0.0.1:7788 --backend xen $timing --connect-timeout 20000 --insecure-plaintext 2>&1 | stamp > /tmp/sync-protect.log &
    if at=$(wait_for_line /tmp/sync-protect.log "protecting: first checkpoint" 120); then
        awk -v a="$t0" -v b="$at" 'BEGIN { printf "%.2f\n", b - a }' >> /tmp/sync-$bin.txt
        awk -v a="$t0" '/live phase shipped/ { printf "%.2f\n", $1 - a; exit }' /tmp/sync-protect.log >> /tmp/sync-$bin-live.txt
        ack=$(wait_for_line /tmp/sync-protect.log "first checkpoint [0-9]* acknowledged" 30) &&
            awk -v a="$t0" -v b="$ack" 'BEGIN { printf "%.2f\n", b - a }' >> /tmp/sync-$bin-ack.txt
        [ "$round" != 1 ] || info "  round 1, $bin's CPU by thread at the first checkpoint: primary: $(thread_cpu "$bin protect *"); backup: $(thread_cpu "$bin receive *"); its restore helper: $(thread_cpu '*libxl-save-helper --restore*')"
    fi
    timeout 30 $bin stop guest > /dev/null 2>&1
    wait_gone "$bin protect *" 60
    for p in $(pids_matching "$bin receive *"); do kill "$p" 2>/dev/null; done
    wait_gone "$bin receive *" 30
    # The planned stop ends the incoming domain (section 9 checks that); xl's next round needs
    # the name free whatever happened.
    xl destroy guest--incoming 2>/dev/null
    [ -n "$at" ]
}
# "median (min … max, n)" of the numbers in $1, or nothing; median and "min…max" alone.
spread() { [ -s "$1" ] && sort -n "$1" | awk '{ v[NR] = $1 } END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f (%.2f … %.2f, %d)", m, v[1], v[NR], NR }'; }
median() { spread "$1" | cut -d' ' -f1; }
range() { [ -s "$1" ] && sort -n "$1" | awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%.2f…%.2f", a, b }'; }
if [ "${SYNC_ROUNDS:-0}" -gt 0 ]; then
    rm -f /tmp/sync-*.txt
    contenders="remusd"
    [ "$XL_BASELINE" = 1 ] && contenders="xl $contenders"
    command -v remusd-before > /dev/null && contenders="$contenders remusd-before"
    info "first synchronisation, $SYNC_ROUNDS rounds of: $contenders (plaintext; the order rotates)"
    round=1; ok=1
    while [ $round -le "$SYNC_ROUNDS" ] && [ $ok = 1 ]; do
        for c in $contenders; do
            case $c in xl) xl_sync_round ;; *) remusd_sync_round "$c" ;; esac || { ok=0; fail "sync round $round: $c took no first checkpoint"; show /tmp/sync-xl.log /tmp/sync-protect.log /tmp/sync-receive.log; diagnose; break; }
            if [ -z "$(ask_counter)" ] && ! { sleep 5; [ -n "$(ask_counter)" ]; }; then
                ok=0; fail "sync round $round: the guest does not answer after $c's round"; diagnose; break
            fi
        done
        contenders="$(echo "$contenders" | cut -d' ' -f2-) $(echo "$contenders" | cut -d' ' -f1)"
        round=$((round + 1))
    done
    if [ $ok = 1 ]; then
        pass "first synchronisation measured $SYNC_ROUNDS times each; the guest answered after every round"
    fi
    [ -s /tmp/sync-xl.txt ] && info "  xl remus, start to the end of the live pre-copy: $(spread /tmp/sync-xl.txt) s"
    info "  remusd, start to the end of the live pre-copy: $(spread /tmp/sync-remusd-live.txt) s; to the first checkpoint taken: $(spread /tmp/sync-remusd.txt) s; acknowledged: $(spread /tmp/sync-remusd-ack.txt) s"
    [ -s /tmp/sync-remusd-before.txt ] && info "  remusd-before, start to the first checkpoint taken: $(spread /tmp/sync-remusd-before.txt) s"
    metric remus_sync_median_s "$(median /tmp/sync-xl.txt)"
    metric remusd_live_median_s "$(median /tmp/sync-remusd-live.txt)"
    metric remusd_sync_median_s "$(median /tmp/sync-remusd.txt)"
    metric remusd_ack_median_s "$(median /tmp/sync-remusd-ack.txt)"
    metric remus_sync_range "$(range /tmp/sync-xl.txt)"
    metric remusd_live_range "$(range /tmp/sync-remusd-live.txt)"
    metric remusd_ack_range "$(range /tmp/sync-remusd-ack.txt)"
    metric sync_rounds "$SYNC_ROUNDS"
fi

for run in 1 2; do
    start_receive /tmp/receive-stop$run.log
    wait_for_line /tmp/receive-stop$run.log "listening" 30 > /dev/null
    start_protect /tmp/protect-stop$run.log
    if wait_for_line /tmp/protect-stop$run.log "protecting: first checkpoint" 300 > /dev/null; then
        if [ $run = 1 ]; then
            # The backup's remusd dies (its restore helper finishes the incoming domain and
            # leaves it paused): a new backup replaces that stale domain and the primary, which
            # kept its guest running, synchronises again.
            kill -9 "$(pid_of "remusd receive *")"
            wait_gone "remusd receive *" 30
            t_lost=$(now)
            start_receive /tmp/receive-again.log
            deadline=$(( ${t_lost%.*} + 240 ))
            while [ "$(grep -ac 'protecting: first checkpoint' /tmp/protect-stop$run.log)" -lt 2 ] && [ "$(now | cut -d. -f1)" -lt $deadline ]; do sleep 1; done
            if [ "$(grep -ac 'protecting: first checkpoint' /tmp/protect-stop$run.log)" -ge 2 ]; then
                pass "backup lost and back: the primary protects again $(since "$t_lost") s after the new backup started ($(grep -ao 'destroyed the stale incoming domain[^(]*' /tmp/receive-again.log | head -1 || echo 'no stale domain was left'))"
            else
                fail "the primary did not protect again after its backup came back"; show /tmp/protect-stop$run.log /tmp/receive-again.log; diagnose
            fi
        fi
        timeout 30 remusd stop guest > /tmp/stop.out 2>&1
        wait_gone "remusd protect *" 60
        incoming=$(xl list 2>/dev/null | awk '$1 ~ /--incoming/ { print $1 }')
        deadline=$(( $(now | cut -d. -f1) + 60 ))
        while [ -n "$incoming" ] && [ "$(now | cut -d. -f1)" -lt $deadline ]; do sleep 1; incoming=$(xl list 2>/dev/null | awk '$1 ~ /--incoming/ { print $1 }'); done
        if [ -z "$incoming" ] && [ -n "$(ask_counter)" ]; then
            pass "planned stop $run: protection ended, no incoming domain left, the guest runs on ($(xl list | awk 'NR > 1 { print $1 }' | tr '\n' ' '))"
        else
            fail "planned stop $run: left ${incoming:-nothing}; guest answers: $(ask_counter)"; show /tmp/protect-stop$run.log /tmp/receive-stop$run.log; diagnose
        fi
    else
        fail "protection run $run after a stop took no checkpoint"; show /tmp/protect-stop$run.log /tmp/receive-stop$run.log; diagnose
    fi
    kill "$(pid_of "remusd receive *")" 2>/dev/null; wait_gone "remusd receive *" 30
done

# --- 10. Failover: the primary domain destroyed under a running remusd ---------------------
# Over the plaintext channel, as xl remus runs here: its first sync is the like-for-like one.
kill "$udp_listener" 2>/dev/null
if protect_afresh destroy plain; then
    metric remusd_sync_plain_s "$afresh_sync_s"
    metric remusd_live_plain_s "$afresh_live_s"
    info "remusd protect over plaintext (as xl remus -s \"\"): first checkpoint after $afresh_sync_s s"
    sleep 10
    counter_before=$(ask_counter)
    t_kill=$(now)
    xl destroy guest
    await_answer "$t_kill" 120
    if [ -n "$answered" ] && [ "$((answer + 3))" -ge "${counter_before:-0}" ]; then
        metric remusd_destroy_answer_s "$answered"
        pass "failover after 'xl destroy' of the primary: the backup answers $answered s later at counter $answer (${counter_before:-?} before); primary said: $(grep -ao 'GUEST LOST[^;]*' /tmp/protect-destroy.log | head -1)"
    else
        fail "no failover after 'xl destroy' of the primary (answer ${answer:-none}, before ${counter_before:-?})"; show /tmp/protect-destroy.log /tmp/receive-destroy.log; diagnose
    fi
    busybox ping -c 2 -W 2 10.0.0.2 > /dev/null 2>&1 && pass "the guest answers ping after the destroy failover" || fail "no ping answer after the destroy failover"
    check_no_repeats /tmp/udp-destroy.log "the destroy failover"
fi
end_test

# --- 11. Planned switchover: the backup runs the guest, nothing lost or doubled -----------
if protect_afresh switchover; then
    sleep 5
    counter_before=$(ask_counter)
    t_switch=$(now)
    timeout 30 remusd failover guest > /tmp/switchover.out 2>&1
    await_answer "$t_switch" 120
    later=""; [ -n "$answer" ] && { sleep 3; later=$(ask_counter); }
    if [ -n "$answered" ] && [ -n "$later" ] && [ "$later" -gt "$answer" ] && [ "$((answer + 1))" -ge "${counter_before:-0}" ]; then
        metric remusd_switchover_answer_s "$answered"
        pass "planned switchover: the backup runs the guest $answered s after 'remusd failover guest' (counter ${counter_before:-?} before, $answer, then $later)"
    else
        fail "planned switchover: answer ${answer:-none} after ${answered:-?} s, then ${later:-none} (before: ${counter_before:-?})"; show /tmp/switchover.out /tmp/protect-switchover.log /tmp/receive-switchover.log; diagnose
    fi
    wait_gone "remusd protect *" 60 && pass "the old primary's remusd ended after the hand-over" || fail "remusd protect still runs after the switchover"
    check_no_repeats /tmp/udp-switchover.log "the switchover"
    deadline=$(( $(now | cut -d. -f1) + 60 ))
    while [ "$(xl list 2>/dev/null | awk 'NR > 2' | wc -l)" -ne 1 ] && [ "$(now | cut -d. -f1)" -lt $deadline ]; do sleep 1; done
    domains=$(xl list 2>/dev/null | awk 'NR > 2 { print $1 }' | tr '\n' ' ')
    [ "$domains" = "guest " ] && pass "after the switchover one domain remains, named guest" || fail "after the switchover the domains are: $domains"
fi
end_test

# --- 12. A replicated disk, 13. its cost (xen-disk-tests.sh) --------------------------------
if [ "${DISK_TESTS:-0}" = 1 ] || [ "${DISK_BENCH:-0}" = 1 ]; then . /xen-disk-tests.sh; fi
cleanup_domains
