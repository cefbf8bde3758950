#!/bin/sh
# /init of the Xen testbed's dom0 (a Debian minbase root in an initramfs): mount, run the
# tests, power off. No init system: Xen's own init script starts its daemons.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# What udev makes on a real host: Xen's hotplug scripts lock with `stat /dev/stdin` (locking.sh)
# and loop for ever without it (a disk's `block add` hung until libxl's timeout).
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /var/log/xen/console
read up _ < /proc/uptime
echo
echo "TESTBED BOOTED uptime=$up kernel=$(uname -r)"
hostname dom0
ip link set lo up
# A watchdog, so a hung toolstack still ends in a verdict and a power-off. run.sh names the guest
# kinds to test and the watchdog's limit on the kernel command line.
. /xen-testbed.conf
cmdline=" $(cat /proc/cmdline) "
arg() { case "$cmdline" in *" $1="*) v=${cmdline#*" $1="}; echo "${v%% *}" ;; esac; }
guests=$(arg testbed_guests | tr '+' ' ')
limit=$(arg testbed_watchdog)
script="/xen-tests.sh ${guests:-pvh}"; limit=${limit:-$((REMUS_SECONDS + 600))}
# Two-host mode (two-hosts.sh) names this host's role on the kernel command line; host B waits
# through host A's guest, remusd's first synchronisation and the failover, so more time.
case "$cmdline" in
    *" testbed_role=primary "*) limit=$((REMUS_SECONDS + 720)); script="/host-role.sh primary ${guests:-pvh}" ;;
    *" testbed_role=backup "*) limit=$((REMUS_SECONDS + 720)); script="/host-role.sh backup ${guests:-pvh}" ;;
esac
timeout -k 10 "$limit" sh $script
if [ $? -ge 124 ]; then
    echo "TESTBED FAIL: the dom0 tests did not finish within $limit s (what was running follows)"
    . /dom0-lib.sh
    diagnose
fi
echo "TESTBED DONE"
sync
/bin/busybox poweroff -f
