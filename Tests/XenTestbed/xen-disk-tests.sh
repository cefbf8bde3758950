# --- 12. A replicated disk (issue #12): I9 across a failover -------------------------------
# Sourced by xen-guest-tests.sh (its helpers, timing and fencing) when DISK_TESTS=1.
# remusd protect serves the primary's image as /dev/nbdN (--xen-disk) before the domain exists
# (--wait-for-domain); the guest is created on it (phy:/dev/nbdN) and writes record i to block
# i, fsyncs, and reports "DISK i" over the network (guest-init.sh), a report remusd releases
# only once the checkpoint after the write is committed. The backup keeps its copy in
# --disk-dir and builds the domain on it (a loop device). After the primary is lost, the guest
# running on the backup's copy must hold every record dom0 had heard of, and every block must be
# a whole record or untouched (no torn or foreign data); the guest then writes on there. Two
# losses: the primary domain destroyed under a running remusd (which then lets go of its NBD
# device), and the primary domain paused and its remusd SIGKILLed (the guest's disk server dies
# with it).
disk_dir=/var/lib/remusd-disk
disk_mib=64
disk_blocks=$((disk_mib * 256))
# Block $1 of image $2 is record $1 (exit 0), all zeros (exit 1), or anything else (exit 2).
block_is() {
    got=$(dd if="$2" bs=4096 skip="$1" count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$(yes "remusd-record-$1" | head -c 4096 | md5sum | cut -d' ' -f1)" ] && return 0
    [ "$got" = "$(head -c 4096 /dev/zero | md5sum | cut -d' ' -f1)" ] && return 1
    return 2
}
# $1: destroy or kill (the loss), $2: the NBD device.
disk_test() {
    loss=$1 nbd=$2
    cleanup_domains
    wait_no_domains 60 || { fail "disk ($loss): domains left before the disk test"; return 1; }
    # blkback serves the guest's disk (the other sections' guests have none, nothing loads it).
    modprobe xen-blkback || { fail "disk ($loss): no xen-blkback module in dom0"; return 1; }
    modprobe nbd || { fail "disk ($loss): no nbd module in dom0"; return 1; }
    modprobe loop
    rm -rf "$disk_dir" && mkdir -p "$disk_dir/backup"
    truncate -s ${disk_mib}M "$disk_dir/primary.img" "$disk_dir/backup/xvda"
    start_udp /tmp/udp-disk.log
    # Each remusd's end is logged with its exit status (a daemon that vanished says how).
    { REMUSD_XEN_DEBUG=1 remusd receive --listen 127.0.0.1:7788 $timing $fencing --insecure-plaintext --xen-allow-path /guest \
        --disk-dir "$disk_dir/backup"; echo "remusd receive exited with status $?"; } 2>&1 | stamp > /tmp/receive-disk.log &
    wait_for_line /tmp/receive-disk.log "listening" 30 > /dev/null || { fail "disk ($loss): remusd receive did not start"; show /tmp/receive-disk.log; return 1; }
    t0=$(now)
    { REMUSD_XEN_DEBUG=1 remusd protect guest 127.0.0.1:7788 --backend xen $timing --connect-timeout 20000 --insecure-plaintext \
        --xen-disk "xvda=$disk_dir/primary.img,$nbd" --wait-for-domain 120; echo "remusd protect exited with status $?"; } 2>&1 | stamp > /tmp/protect-disk.log &
    if ! wait_for_line /tmp/protect-disk.log "serving disk 'xvda'" 30 > /dev/null; then
        fail "disk ($loss): remusd protect does not serve the disk as $nbd"; show /tmp/protect-disk.log; return 1
    fi
    pass "disk ($loss): remusd protect serves $disk_dir/primary.img as $nbd before the domain exists"
    write_guest_config
    sed -i 's/^extra = "\(.*\)"/extra = "\1 testbed_disk=1"/' /etc/xen/guest.cfg
    echo "disk = [ 'phy:$nbd,xvda,w' ]" >> /etc/xen/guest.cfg
    if ! xl create /etc/xen/guest.cfg > /tmp/xl-create-disk.log 2>&1; then
        fail "disk ($loss): xl create with disk phy:$nbd"; show /tmp/xl-create-disk.log /var/log/xen/xen-hotplug.log /tmp/protect-disk.log; diagnose; return 1
    fi
    if at=$(wait_for_line /tmp/protect-disk.log "protecting: first checkpoint" 300); then
        pass "disk ($loss): the guest on $nbd is protected, first checkpoint after $(awk -v a="$t0" -v b="$at" 'BEGIN { printf "%.1f", b - a }') s (disk copied with it)"
    else
        fail "disk ($loss): no checkpoint within 300 s"; show /tmp/protect-disk.log /tmp/receive-disk.log; dmesg | tail -15; diagnose; return 1
    fi
    grep -aq "GUEST DISK xvda" "$console_dir/guest-guest.log" || { fail "disk ($loss): the guest sees no /dev/xvda"; show "$console_dir/guest-guest.log"; diagnose; return 1; }
    # Records reported while protected: enough of them to tell.
    deadline=$(( $(now | cut -d. -f1) + 180 ))
    until [ "$(grep -ac 'DISK [0-9]' /tmp/udp-disk.log)" -ge 15 ] || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
    reported=$(grep -ao 'DISK [0-9]*' /tmp/udp-disk.log | cut -d' ' -f2 | sort -n | tail -1)
    if [ -z "$reported" ]; then fail "disk ($loss): no record reported by the protected guest"; show /tmp/udp-disk.log "$console_dir/guest-guest.log" /tmp/protect-disk.log; diagnose; return 1; fi
    grep -aq 'DISK FAILED' /tmp/udp-disk.log "$console_dir/guest-guest.log" && fail "disk ($loss): the guest saw a failed write on $nbd"
    # The primary host dies with its guest: whatever dom0 heard of is all that counts.
    counter_before=$(ask_counter)
    t_kill=$(now)
    cp /tmp/udp-disk.log /tmp/udp-disk-before.log
    if [ "$loss" = destroy ]; then
        xl destroy guest
    else
        xl pause guest
        kill -9 "$(pid_of "remusd protect *")"
    fi
    heard=$(grep -ao 'DISK [0-9]*' /tmp/udp-disk-before.log | cut -d' ' -f2 | sort -n | tail -1)
    await_answer "$t_kill" 120
    if [ -z "$answered" ]; then
        fail "disk ($loss): no failover within 120 s of losing the primary"; show /tmp/receive-disk.log /tmp/protect-disk.log; diagnose; return 1
    fi
    pass "disk ($loss): failover: the backup answers $answered s later (counter ${counter_before:-?} before, $answer after)"
    grep -a "ACTIVATED\|disk" /tmp/receive-disk.log | tail -4 | sed 's/^/    | /'
    # I9 on the backup's copy, as the guest resumed on it; paused meanwhile, so no block is read
    # while the guest writes it.
    xl pause guest
    missing=""; torn=""; i=0; present=0
    while [ $i -le $((heard + 40)) ] && [ $i -lt $disk_blocks ]; do
        block_is $i "$disk_dir/backup/xvda"; r=$?
        if [ $r -eq 0 ]; then present=$((present + 1)); fi
        if [ $i -le "$heard" ] && [ $r -ne 0 ]; then missing="$missing $i"; fi
        if [ $r -eq 2 ]; then torn="$torn $i"; fi
        i=$((i + 1))
    done
    if [ -z "$missing" ]; then
        pass "disk ($loss): every record dom0 heard of before the kill (0..$heard) is on the backup's disk"
    else
        fail "disk ($loss): records dom0 heard of are missing on the backup's disk:$(echo $missing | cut -c1-200)"
    fi
    if [ -z "$torn" ]; then
        pass "disk ($loss): no torn or foreign block on the backup's disk (blocks 0..$((heard + 40)): $present whole records, the rest untouched)"
    else
        fail "disk ($loss): blocks neither a whole record nor untouched:$(echo $torn | cut -c1-200)"
    fi
    xl unpause guest
    # The guest writes on, on the backup's copy.
    deadline=$(( $(now | cut -d. -f1) + 60 ))
    until [ "$(grep -ao 'DISK [0-9]*' /tmp/udp-disk.log | cut -d' ' -f2 | sort -n | tail -1)" -gt $((heard + 5)) ] || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
    after=$(grep -ao 'DISK [0-9]*' /tmp/udp-disk.log | cut -d' ' -f2 | sort -n | tail -1)
    if [ "$after" -gt $((heard + 5)) ] && block_is "$after" "$disk_dir/backup/xvda"; then
        pass "disk ($loss): the guest writes on to the backup's copy (record $after reported and on it)"
    else
        fail "disk ($loss): the guest did not write on after the failover (last record $heard before, ${after:-none} after)"
    fi
    if [ "$loss" = destroy ]; then
        wait_gone "remusd protect *" 30 && pass "disk ($loss): the primary's remusd let go of $nbd once its domain was gone" \
            || fail "disk ($loss): remusd protect still runs after its domain was destroyed"
    fi
}
disk_test destroy /dev/nbd0
end_test
disk_test kill /dev/nbd1
end_test
