#!/bin/busybox sh
# /init of the testbed's PV guest (busybox only): network through xen-netfront, a TCP responder
# on port 7 answering with the counter, and a counter printed on the console and sent to dom0 over
# UDP once a second.
# The guest knows nothing of Remus; dom0 watches it from outside.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp

for m in $(cat /lib/modules-load/order); do insmod "/lib/modules-load/$m.ko"; done
ip link set lo up
# netfront attaches asynchronously (xenbus): wait for eth0, at most ~20 s.
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 200 ]; do usleep 100000; n=$((n + 1)); done
if ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up; then
    echo "GUEST NET UP eth0 10.0.0.2"
else
    echo "GUEST NET FAILED"
fi

echo 0 > /tmp/counter
printf '#!/bin/sh\necho "COUNTER $(cat /tmp/counter)"\n' > /bin/counter-reply
chmod +x /bin/counter-reply
nc -ll -p 7 -e /bin/counter-reply &

# Every counter line also goes to dom0 over UDP (10.0.0.1:9000), one datagram per line, through
# busybox's syslogd forwarding (its nc has no UDP): the output the outside world sees, where a
# line sent twice after a failover shows as a duplicate.
syslogd -n -R 10.0.0.1:9000 &

# Waits for /dev/xvda, at most ~20 s (blkfront attaches asynchronously, like netfront).
wait_for_disk() {
    n=0
    while [ ! -b /dev/xvda ] && [ $n -lt 200 ]; do usleep 100000; n=$((n + 1)); done
    [ -b /dev/xvda ]
}
# Record i, 4096 bytes of "remusd-record-<i>" lines, is written and fsynced by "$1 i", then
# reported to dom0 over the network as "$2 i"; five records a second, in the background.
write_records() {
    (
        i=0
        while [ $i -lt 16000 ]; do
            yes "remusd-record-$i" | head -c 4096 > /tmp/record
            if $1 $i; then
                logger -t guest "$2 $i"
            else
                echo "GUEST $2 WRITE FAILED $i"
                logger -t guest "$2 FAILED $i"
            fi
            i=$((i + 1))
            usleep 200000
        done
    ) &
}
record_to_block() { dd if=/tmp/record of=/dev/xvda bs=4096 seek="$1" count=1 conv=notrunc,fsync 2>/dev/null; }
record_to_file() { dd if=/tmp/record of="/mnt/rec-$1" bs=4096 count=1 conv=fsync 2>/dev/null; }

# With a replicated disk (testbed_disk=1 on the kernel command line: xen-disk-tests.sh), record i
# goes to block i of /dev/xvda ("DISK <i>"). remusd holds that report until the checkpoint after
# the write is committed, so every record dom0 heard of must be on the disk the backup resumes
# the guest on (I9).
if grep -q testbed_disk=1 /proc/cmdline; then
    if wait_for_disk; then
        echo "GUEST DISK xvda"
        write_records record_to_block DISK
    else
        echo "GUEST DISK MISSING"
    fi
fi

# With testbed_fs=1 (xen-disk-tests.sh: dom0 partitioned the disk, an MBR in 512-byte sectors,
# and made an ext4 file system on its partition): record i is the file /rec-<i> ("FILE <i>"),
# so that after a failover the backup's copy must pass fsck and hold every file dom0 heard of,
# whole.
if grep -q testbed_fs=1 /proc/cmdline; then
    wait_for_disk
    n=0
    while [ ! -b /dev/xvda1 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
    mkdir -p /mnt
    if mount -t ext4 /dev/xvda1 /mnt; then
        echo "GUEST FS xvda"
        write_records record_to_file FILE
    else
        echo "GUEST FS MOUNT FAILED"
    fi
fi

# With testbed_diskbench=1 (xen-disk-tests.sh's benchmark): once dom0 connects to port 8, the
# disk benchmark (diskbench.c) runs on /dev/xvda past the first 16 MiB, and each of its lines goes
# to the console and to dom0.
if grep -q testbed_diskbench=1 /proc/cmdline; then
    wait_for_disk
    (
        nc -l -p 8 < /dev/null > /dev/null
        diskbench /dev/xvda 16 2>&1 | while read -r line; do
            echo "$line"
            logger -t guest "$line"
        done
    ) &
fi

i=0
while :; do
    read up _ < /proc/uptime
    echo "COUNTER $i up=$up"
    logger -t guest "COUNTER $i up=$up"
    echo "$i" > /tmp/counter
    i=$((i + 1))
    sleep 1
done
