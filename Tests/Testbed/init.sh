#!/bin/busybox sh
# /init of the netbuf testbed's initramfs: mount, load modules, run the tests, power off.
/bin/busybox --install -s /bin
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
read up _ < /proc/uptime
echo
echo "TESTBED BOOTED uptime=$up kernel=$(uname -r)"

for m in $(cat /lib/modules-load/order); do
    case "$m" in
        ifb) insmod "/lib/modules-load/$m.ko" numifbs=0 ;;   # no stray ifb0/ifb1
        *) insmod "/lib/modules-load/$m.ko" ;;
    esac || echo "TESTBED FAIL: insmod $m"
done

ip link set lo up
sh /guest-tests.sh
echo "TESTBED DONE"
poweroff -f
