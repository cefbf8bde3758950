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

# With a replicated disk (testbed_disk=1 on the kernel command line: xen-disk-tests.sh), record i
# goes to block i of /dev/xvda: 4096 bytes of "remusd-record-<i>" lines, written and fsynced,
# then reported to dom0 over the network ("DISK <i>"). remusd holds that report until the
# checkpoint after the write is committed, so every record dom0 heard of must be on the disk the
# backup resumes the guest on (I9).
if grep -q testbed_disk=1 /proc/cmdline; then
    n=0
    while [ ! -b /dev/xvda ] && [ $n -lt 200 ]; do usleep 100000; n=$((n + 1)); done
    if [ -b /dev/xvda ]; then
        echo "GUEST DISK xvda"
        (
            i=0
            while [ $i -lt 16000 ]; do
                yes "remusd-record-$i" | head -c 4096 > /tmp/record
                if dd if=/tmp/record of=/dev/xvda bs=4096 seek=$i count=1 conv=notrunc,fsync 2>/dev/null; then
                    logger -t guest "DISK $i"
                else
                    echo "GUEST DISK WRITE FAILED $i"
                    logger -t guest "DISK FAILED $i"
                fi
                i=$((i + 1))
                usleep 200000
            done
        ) &
    else
        echo "GUEST DISK MISSING"
    fi
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
