# --- 12. A replicated disk (issue #12): I9 across a failover -------------------------------
# Sourced by xen-guest-tests.sh (its helpers, timing and fencing) when DISK_TESTS=1.
# remusd protect serves the primary's image as /dev/nbdN (--xen-disk) before the domain exists
# (--wait-for-domain); the guest is created on it (phy:/dev/nbdN) and writes record i to block
# i, fsyncs, and reports "DISK i" over the network (guest-init.sh), a report remusd releases
# only once the checkpoint after the write is committed. The backup keeps its copy in
# --disk-dir and builds the domain on it (a loop device). After the primary is lost, the guest
# running on the backup's copy must hold every record dom0 had heard of, and every block must be
# a whole record or untouched (no torn or foreign data); the guest then writes on there. Every
# failover kind: the primary domain destroyed under a running remusd (which then lets go of its
# NBD device), the primary domain paused and its remusd SIGKILLed (the guest's disk server dies
# with it), and a planned switchover (`remusd failover guest`: the old primary's remusd hands the
# guest over, then lets go of its device once its domain is gone).
# In the kill test the disk is partitioned as a real VM's image is (an MBR in 512-byte sectors,
# one partition from 1 MiB on) and the partition holds an ext4 file system (dom0's mkfs.ext4);
# the records are its files /rec-<i>, each fsynced before "FILE i" is reported (testbed_fs=1):
# the backup's copy, as a crash leaves it, must then pass e2fsck once its journal is replayed and
# hold every file dom0 heard of, whole.
# In the destroy test both sides' images are block devices, as logical volumes are: the primary
# serves /dev/loopP (over its image file) and the backup's --disk-dir entry is a symbolic link to
# /dev/loopB, which it gives the domain as it is (no loop device of its own in between). The
# checks read the files behind the devices.
# With DISK_BENCH=1, section 13 (below) measures what the replication costs the guest's disk.
disk_dir=/var/lib/remusd-disk
disk_mib=64
disk_blocks=$((disk_mib * 256))
# The failover tests log libxenguest's steps (REMUSD_XEN_DEBUG); the benchmark does not.
disk_debug=1
# Block $1 of image $2 is record $1 (exit 0), all zeros (exit 1), or anything else (exit 2).
block_is() {
    got=$(dd if="$2" bs=4096 skip="$1" count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$(yes "remusd-record-$1" | head -c 4096 | md5sum | cut -d' ' -f1)" ] && return 0
    [ "$got" = "$(head -c 4096 /dev/zero | md5sum | cut -d' ' -f1)" ] && return 1
    return 2
}
# The partition the fs layout uses: from 1 MiB (sector 2048) to the end of the disk.
part_offset_mib=1
part_sectors=$(( (disk_mib - part_offset_mib) * 2048 ))
# Writes an MBR with that one Linux partition (type 0x83) onto image $1: what the guest's kernel
# reads in 512-byte sectors. The bytes (dash's printf takes octal escapes): the partition entry at
# 446 (not bootable, CHS unused, type, first sector 2048 and the sector count, little-endian),
# the signature 55 AA at 510.
write_mbr() {
    n=$part_sectors
    le32() { printf "\\%03o\\%03o\\%03o\\%03o" $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
    # shellcheck disable=SC2059
    printf "\000\000\000\000\203\000\000\000$(le32 2048)$(le32 "$n")" | dd of="$1" bs=1 seek=446 conv=notrunc 2>/dev/null
    printf '\125\252' | dd of="$1" bs=1 seek=510 conv=notrunc 2>/dev/null
}
# The ext4 file system on the partition of image $1, as the guest left it: e2fsck replays its journal on a copy
# (exit 0 or 1: nothing or only that was done) and then finds nothing to fix (exit 0); the files
# /rec-0 … /rec-$2 are each a whole record. Sets fs_problem (empty when all is well) and fs_files.
check_fs() {
    fs_problem=""
    dd if="$1" of=/tmp/fs-check.img bs=1M skip=$part_offset_mib 2>/dev/null
    e2fsck -p /tmp/fs-check.img > /tmp/e2fsck-p.log 2>&1; r=$?
    [ $r -le 1 ] || { fs_problem="e2fsck -p (journal replay) exited $r: $(tail -3 /tmp/e2fsck-p.log | tr '\n' ' ')"; return; }
    e2fsck -fn /tmp/fs-check.img > /tmp/e2fsck-n.log 2>&1; r=$?
    [ $r -eq 0 ] || { fs_problem="e2fsck -fn found problems (exit $r): $(grep -v '^Pass\|^e2fsck\|^/tmp' /tmp/e2fsck-n.log | head -3 | tr '\n' ' ')"; return; }
    rm -rf /tmp/fs-files && mkdir /tmp/fs-files
    debugfs -R "rdump / /tmp/fs-files" /tmp/fs-check.img > /dev/null 2>&1
    fs_files=$(ls /tmp/fs-files | grep -c '^rec-')
    i=0; bad=""
    while [ $i -le "$2" ]; do
        [ "$(md5sum < /tmp/fs-files/rec-$i 2>/dev/null | cut -d' ' -f1)" = "$(yes "remusd-record-$i" | head -c 4096 | md5sum | cut -d' ' -f1)" ] || bad="$bad $i"
        i=$((i + 1))
    done
    [ -z "$bad" ] || fs_problem="files missing or not whole:$(echo $bad | cut -c1-200)"
}
# The raw blocks of image $1 against the records dom0 heard of (0..$2): PASS or FAIL that every
# one is there, and that every block up to 40 past it is a whole record or untouched.
check_blocks() {
    missing=""; torn=""; i=0; present=0
    while [ $i -le $(($2 + 40)) ] && [ $i -lt $disk_blocks ]; do
        block_is $i "$1"; r=$?
        if [ $r -eq 0 ]; then present=$((present + 1)); fi
        if [ $i -le "$2" ] && [ $r -ne 0 ]; then missing="$missing $i"; fi
        if [ $r -eq 2 ]; then torn="$torn $i"; fi
        i=$((i + 1))
    done
    if [ -z "$missing" ]; then
        pass "disk ($loss): every record dom0 heard of before the loss (0..$2) is on the backup's disk"
    else
        fail "disk ($loss): records dom0 heard of are missing on the backup's disk:$(echo $missing | cut -c1-200)"
    fi
    if [ -z "$torn" ]; then
        pass "disk ($loss): no torn or foreign block on the backup's disk (blocks 0..$(($2 + 40)): $present whole records, the rest untouched)"
    else
        fail "disk ($loss): blocks neither a whole record nor untouched:$(echo $torn | cut -c1-200)"
    fi
}
# The highest record number ($1: DISK or FILE) that UDP log $2 holds, or nothing.
last_record() { grep -ao "$1 [0-9]*" "$2" | cut -d' ' -f2 | sort -n | tail -1; }
# No domain but dom0, the modules a served disk needs, fresh empty images for the primary and
# the backup. Returns 1 after a FAIL line naming $1.
fresh_disks() {
    cleanup_domains
    wait_no_domains 60 || { fail "$1: domains left before it"; return 1; }
    # blkback serves the guest's disk (the other sections' guests have none, nothing loads it).
    modprobe xen-blkback || { fail "$1: no xen-blkback module in dom0"; return 1; }
    modprobe nbd || { fail "$1: no nbd module in dom0"; return 1; }
    modprobe loop
    # The volumes of a test before (their domains are gone, so nothing holds them).
    for volume in $(losetup -j "$disk_dir/primary.img" -O NAME -n 2>/dev/null) $(losetup -j "$disk_dir/backup-volume.img" -O NAME -n 2>/dev/null); do
        losetup -d "$volume"
    done
    rm -rf "$disk_dir" && mkdir -p "$disk_dir/backup"
    truncate -s ${disk_mib}M "$disk_dir/primary.img" "$disk_dir/backup/xvda"
    primary_image=$disk_dir/primary.img
}
# A backup with --disk-dir on 127.0.0.1:7788, logging to $1; returns once it listens. Each
# remusd's end is logged with its exit status (a daemon that vanished says how); $disk_debug
# (1 or 0) is its REMUSD_XEN_DEBUG.
start_disk_backup() {
    { REMUSD_XEN_DEBUG=$disk_debug remusd receive --listen 127.0.0.1:7788 $timing $fencing --insecure-plaintext --xen-allow-path /guest \
        --disk-dir "$disk_dir/backup"; echo "remusd receive exited with status $?"; } 2>&1 | stamp > "$1" &
    wait_for_line "$1" "listening" 30 > /dev/null
}
# A primary for backup $2 serving the primary's image as NBD device $3, logging to $1; returns
# once it serves the disk, before the domain exists (--wait-for-domain).
start_disk_primary() {
    { REMUSD_XEN_DEBUG=$disk_debug remusd protect guest "$2" --backend xen $timing --connect-timeout 20000 --insecure-plaintext \
        --xen-disk "xvda=$primary_image,$3" --wait-for-domain 120; echo "remusd protect exited with status $?"; } 2>&1 | stamp > "$1" &
    wait_for_line "$1" "serving disk 'xvda'" 30 > /dev/null
}
# Creates the guest on disk device $1 with $2 on its kernel command line; xl's output in $3.
create_guest_on() {
    write_guest_config
    sed -i "s/^extra = \"\(.*\)\"/extra = \"\1 $2\"/" /etc/xen/guest.cfg
    echo "disk = [ 'phy:$1,xvda,w' ]" >> /etc/xen/guest.cfg
    xl create /etc/xen/guest.cfg > "$3" 2>&1
}
# $1: destroy, kill or switchover (the loss), $2: the NBD device, $3: blocks (records in the raw
# disk's blocks) or fs (records as files of an ext4 file system), $4: file (image files, the
# default) or volume (block devices on both sides).
disk_test() {
    loss=$1 nbd=$2 layout=$3 store=${4:-file}
    if [ "$layout" = fs ]; then unit=FILE; mode=testbed_fs=1; else unit=DISK; mode=testbed_disk=1; fi
    fresh_disks "disk ($loss)" || return 1
    # The file system is made apart and copied into the partition (mkfs picks 1 KiB blocks for
    # a disk this small: they need the 512-byte sectors remusd serves).
    if [ "$layout" = fs ]; then
        write_mbr "$disk_dir/primary.img"
        truncate -s $((disk_mib - part_offset_mib))M /tmp/fs-part.img
        if ! mkfs.ext4 -q -F /tmp/fs-part.img > /tmp/mkfs.log 2>&1; then
            fail "disk ($loss): mkfs.ext4 for the primary's partition"; show /tmp/mkfs.log; return 1
        fi
        dd if=/tmp/fs-part.img of="$disk_dir/primary.img" bs=1M seek=$part_offset_mib conv=notrunc,sparse 2>/dev/null
        rm -f /tmp/fs-part.img
    fi
    # What the backup's guest runs on, read by the checks: its image, or the file behind its volume.
    backup_image=$disk_dir/backup/xvda
    if [ "$store" = volume ]; then
        primary_image=$(losetup -f --show "$disk_dir/primary.img") || { fail "disk ($loss): no loop device for the primary's volume"; return 1; }
        mv "$disk_dir/backup/xvda" "$disk_dir/backup-volume.img"
        backup_volume=$(losetup -f --show "$disk_dir/backup-volume.img") || { fail "disk ($loss): no loop device for the backup's volume"; return 1; }
        ln -s "$backup_volume" "$disk_dir/backup/xvda"
        backup_image=$disk_dir/backup-volume.img
        pass "disk ($loss): the images are block devices: the primary serves $primary_image, the backup's xvda links to $backup_volume"
    fi
    start_udp /tmp/udp-disk.log
    start_disk_backup /tmp/receive-disk.log || { fail "disk ($loss): remusd receive did not start"; show /tmp/receive-disk.log; return 1; }
    t0=$(now)
    if ! start_disk_primary /tmp/protect-disk.log 127.0.0.1:7788 "$nbd"; then
        fail "disk ($loss): remusd protect does not serve the disk as $nbd"; show /tmp/protect-disk.log; return 1
    fi
    pass "disk ($loss): remusd protect serves $primary_image as $nbd before the domain exists"
    if ! create_guest_on "$nbd" "$mode" /tmp/xl-create-disk.log; then
        fail "disk ($loss): xl create with disk phy:$nbd"; show /tmp/xl-create-disk.log /var/log/xen/xen-hotplug.log /tmp/protect-disk.log; diagnose; return 1
    fi
    if at=$(wait_for_line /tmp/protect-disk.log "protecting: first checkpoint" 300); then
        pass "disk ($loss): the guest on $nbd is protected, first checkpoint after $(awk -v a="$t0" -v b="$at" 'BEGIN { printf "%.1f", b - a }') s (disk copied with it)"
    else
        fail "disk ($loss): no checkpoint within 300 s"; show /tmp/protect-disk.log /tmp/receive-disk.log; dmesg | tail -15; diagnose; return 1
    fi
    if [ "$layout" = fs ]; then
        wait_for_line "$console_dir/guest-guest.log" "GUEST FS xvda\|GUEST FS MOUNT FAILED" 60 > /dev/null
        grep -aq "GUEST FS xvda" "$console_dir/guest-guest.log" || { fail "disk ($loss): the guest did not mount the ext4 file system on /dev/xvda"; show "$console_dir/guest-guest.log"; diagnose; return 1; }
    else
        grep -aq "GUEST DISK xvda" "$console_dir/guest-guest.log" || { fail "disk ($loss): the guest sees no /dev/xvda"; show "$console_dir/guest-guest.log"; diagnose; return 1; }
    fi
    # Records reported while protected: enough of them to tell.
    deadline=$(( $(now | cut -d. -f1) + 180 ))
    until [ "$(grep -ac "$unit [0-9]" /tmp/udp-disk.log)" -ge 15 ] || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
    reported=$(last_record $unit /tmp/udp-disk.log)
    if [ -z "$reported" ]; then fail "disk ($loss): no record reported by the protected guest"; show /tmp/udp-disk.log "$console_dir/guest-guest.log" /tmp/protect-disk.log; diagnose; return 1; fi
    grep -aq "$unit FAILED" /tmp/udp-disk.log "$console_dir/guest-guest.log" && fail "disk ($loss): the guest saw a failed write on $nbd"
    # The primary host dies with its guest: whatever dom0 heard of is all that counts.
    counter_before=$(ask_counter)
    t_kill=$(now)
    cp /tmp/udp-disk.log /tmp/udp-disk-before.log
    case $loss in
        destroy) xl destroy guest ;;
        kill) xl pause guest; kill -9 "$(pid_of "remusd protect *")" ;;
        switchover) timeout 30 remusd failover guest > /tmp/switchover-disk.out 2>&1 ;;
    esac
    heard=$(last_record $unit /tmp/udp-disk-before.log)
    await_answer "$t_kill" 120
    if [ -z "$answered" ]; then
        fail "disk ($loss): no failover within 120 s of losing the primary"; show /tmp/receive-disk.log /tmp/protect-disk.log; diagnose; return 1
    fi
    pass "disk ($loss): failover: the backup answers $answered s later (counter ${counter_before:-?} before, $answer after)"
    grep -a "ACTIVATED\|disk" /tmp/receive-disk.log | tail -4 | sed 's/^/    | /'
    # I9 on the backup's copy, as the guest resumed on it; paused meanwhile, so no block is read
    # while the guest writes it. The old primary's domain is gone first (a switchover's hand-over
    # ends it), so that "guest" names the one on the backup.
    deadline=$(( $(now | cut -d. -f1) + 60 ))
    while [ "$(xl list 2>/dev/null | awk 'NR > 2' | wc -l)" -ne 1 ] && [ "$(now | cut -d. -f1)" -lt $deadline ]; do sleep 1; done
    xl pause guest
    if [ "$layout" = fs ]; then
        check_fs "$backup_image" "$heard"
        if [ -z "$fs_problem" ]; then
            pass "disk ($loss): the backup's ext4 file system is clean after its journal replay (e2fsck) and holds every file dom0 heard of, whole (rec-0..rec-$heard; $fs_files files)"
        else
            fail "disk ($loss): the backup's file system: $fs_problem"; show /tmp/e2fsck-p.log /tmp/e2fsck-n.log
        fi
    else
        check_blocks "$backup_image" "$heard"
    fi
    xl unpause guest
    # The guest writes on, on the backup's copy.
    deadline=$(( $(now | cut -d. -f1) + 60 ))
    until [ "$(last_record $unit /tmp/udp-disk.log)" -gt $((heard + 5)) ] || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
    after=$(last_record $unit /tmp/udp-disk.log)
    if [ "$after" -gt $((heard + 5)) ] && { [ "$layout" = fs ] || block_is "$after" "$backup_image"; }; then
        pass "disk ($loss): the guest writes on to the backup's copy (record $after reported$([ "$layout" = fs ] || echo " and on it"))"
    else
        fail "disk ($loss): the guest did not write on after the failover (last record $heard before, ${after:-none} after)"
    fi
    if [ "$loss" != kill ]; then
        wait_gone "remusd protect *" 30 && pass "disk ($loss): the primary's remusd let go of $nbd once its domain was gone" \
            || { fail "disk ($loss): remusd protect still runs after its domain ended"; show /tmp/protect-disk.log /tmp/switchover-disk.out; }
    fi
}
if [ "${DISK_TESTS:-0}" = 1 ]; then
    disk_test destroy /dev/nbd0 blocks volume
    end_test
    disk_test kill /dev/nbd1 fs
    end_test
    disk_test switchover /dev/nbd2 blocks
    end_test
fi

# --- 13. What replication costs the guest's disk (issue #12, item 7): a benchmark ------------
# With DISK_BENCH=1. The guest (testbed_diskbench=1 in guest-init.sh) runs diskbench.c on its
# /dev/xvda once dom0 connects to its port 8: the latency of a 4 KiB write and its fdatasync,
# 200 times, and 5 rounds of 16 MiB in 1 MiB writes and an fdatasync, timed by the guest's own
# clock (which runs on through checkpoint pauses: they count). Three times, on a fresh image
# each time: unprotected on a loop device (what a file-backed disk is in dom0); served by
# remusd protect --xen-disk with no backup to reach (the NBD path and the journal alone: remusd
# keeps trying to connect, the guest runs unprotected); and served and checkpointed every
# INTERVAL_MS to a backup on this dom0 that logs and applies each epoch. The images are in
# dom0's RAM: no real disk's latency in any of them. The numbers go to the table run.sh prints.
# $1: loop, served or remusd; $2: the NBD device for the last two.
disk_bench() {
    mode=$1 nbd=$2 disk_debug=0
    fresh_disks "disk benchmark ($mode)" || return 1
    start_udp /tmp/udp-bench-$mode.log
    if [ "$mode" = loop ]; then
        dev=$(losetup -f --show "$disk_dir/primary.img") || { fail "disk benchmark (loop): losetup"; return 1; }
    else
        dev=$nbd
        # served: a backup address nothing listens on.
        backup=127.0.0.1:7788; [ "$mode" = served ] && backup=127.0.0.1:7799
    fi
    if [ "$mode" = remusd ]; then
        start_disk_backup /tmp/receive-bench.log || { fail "disk benchmark: remusd receive did not start"; show /tmp/receive-bench.log; return 1; }
    fi
    if [ "$mode" != loop ]; then
        start_disk_primary /tmp/protect-bench.log "$backup" "$nbd" || { fail "disk benchmark: remusd protect does not serve the disk"; show /tmp/protect-bench.log; return 1; }
    fi
    create_guest_on "$dev" testbed_diskbench=1 /tmp/xl-create-bench.log || { fail "disk benchmark ($mode): xl create on $dev"; show /tmp/xl-create-bench.log; diagnose; return 1; }
    if [ "$mode" = remusd ] && ! wait_for_line /tmp/protect-bench.log "protecting: first checkpoint" 300 > /dev/null; then
        fail "disk benchmark: no checkpoint within 300 s"; show /tmp/protect-bench.log /tmp/receive-bench.log; diagnose; return 1
    fi
    # The guest listens on port 8 once it has /dev/xvda: connecting starts the benchmark.
    deadline=$(( $(now | cut -d. -f1) + guest_boot_s ))
    until busybox nc -w 2 "$guest_ip" 8 < /dev/null > /dev/null 2>&1; do
        [ "$(now | cut -d. -f1)" -lt $deadline ] || { fail "disk benchmark ($mode): the guest never listened on port 8"; show "$console_dir/guest-guest.log"; diagnose; return 1; }
        sleep 1
    done
    t0=$(now)
    deadline=$(( ${t0%.*} + 600 ))
    until grep -aq 'DISKBENCH \(done\|failed\)' /tmp/udp-bench-$mode.log || [ "$(now | cut -d. -f1)" -ge $deadline ]; do sleep 1; done
    if ! grep -aq 'DISKBENCH done' /tmp/udp-bench-$mode.log; then
        fail "disk benchmark ($mode): $(grep -ao 'DISKBENCH failed.*' /tmp/udp-bench-$mode.log || echo "not done within 600 s")"; show /tmp/udp-bench-$mode.log "$console_dir/guest-guest.log"; diagnose; return 1
    fi
    fsync=$(grep -ao 'DISKBENCH fsync4k [^<]*' /tmp/udp-bench-$mode.log | head -1)
    grep -ao 'DISKBENCH seq round=[0-9]* mbps=[0-9.]*' /tmp/udp-bench-$mode.log | sed 's/.*mbps=//' > /tmp/bench-seq-$mode.txt
    pass "disk benchmark ($mode on $dev): done in $(since "$t0") s; ${fsync#DISKBENCH }; MB/s of 16 MiB rounds: $(spread /tmp/bench-seq-$mode.txt)"
    for q in p10 p50 p90; do metric disk_${mode}_fsync_${q}_ms "$(echo "$fsync" | sed -n "s/.* $q=\([0-9.]*\).*/\1/p")"; done
    metric disk_${mode}_seq_mbps "$(median /tmp/bench-seq-$mode.txt)"
    metric disk_${mode}_seq_range "$(range /tmp/bench-seq-$mode.txt)"
    # What the checkpoints cost meanwhile: the guest is suspended for each pause.
    [ "$mode" = remusd ] && info "disk benchmark (remusd): remusd status: pause $(status_field pause); $(status_field 'checkpoint size')"
    # A planned stop first, so that destroying the domain is no loss the backup takes over from;
    # the primary's remusd then lets go of the device once the domain is gone.
    [ "$mode" != loop ] && timeout 30 remusd stop guest > /dev/null 2>&1
    xl destroy guest
    if [ "$mode" = loop ]; then losetup -d "$dev"; else wait_gone "remusd protect *" 30; fi
    return 0
}
if [ "${DISK_BENCH:-0}" = 1 ]; then
    disk_bench loop
    end_test
    disk_bench served /dev/nbd3
    end_test
    disk_bench remusd /dev/nbd4
    end_test
fi
