# Shared by the QEMU testbeds (Tests/Testbed, Tests/XenTestbed): building initramfs images from
# the build machine's own Debian packages, and the verdict of a run. Source it; it defines
# functions only.

# Seconds since a `date +%s.%N` timestamp, one decimal.
testbed_elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# Kernel modules with their dependencies, in load order, decompressed into
# ROOT/lib/modules-load/<name>.ko (busybox insmod reads plain .ko files only), their names in
# ROOT/lib/modules-load/order.  Usage: testbed_collect_modules ROOT KVER MODULE...
# The modules come from TESTBED_MODULES_BASE/lib/modules/KVER (default: the build host's own).
testbed_collect_modules() {
    local root=$1 kver=$2; shift 2
    mkdir -p "$root/lib/modules-load"
    : > "$root/lib/modules-load/order"
    for m in "$@"; do
        modprobe -d "${TESTBED_MODULES_BASE:-/}" --show-depends -S "$kver" "$m" | while read -r kind path _; do
            [ "$kind" = insmod ] || continue
            name=$(basename "$path"); name=${name%%.ko*}
            grep -qx "$name" "$root/lib/modules-load/order" && continue
            case "$path" in
                *.ko.xz) xz -dc "$path" > "$root/lib/modules-load/$name.ko" ;;
                *.ko.zst) zstd -qdc "$path" > "$root/lib/modules-load/$name.ko" ;;
                *.ko.gz) gzip -dc "$path" > "$root/lib/modules-load/$name.ko" ;;
                *) cp "$path" "$root/lib/modules-load/$name.ko" ;;
            esac
            echo "$name" >> "$root/lib/modules-load/order"
        done
    done
}

# The shared libraries a binary loads (absolute paths, the dynamic loader included), one per line.
testbed_shared_libs() {
    ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u
}

# The verdict of one QEMU run from its console log (CR stripped): QEMU timed out, the tests did
# not finish (no TESTBED DONE), a FAIL line, or no PASS line at all fail the run (exit 1);
# otherwise it says how many checks passed.  Usage: testbed_verdict NAME LOG.txt QEMU_STATUS TIMEOUT_S
testbed_verdict() {
    if [ "$3" -eq 124 ]; then
        echo "TESTBED FAIL: QEMU did not power off within $4 s (see ${2%.txt})"; exit 1
    fi
    if ! grep -aq "^TESTBED DONE" "$2"; then
        echo "TESTBED FAIL: the tests did not finish (QEMU status $3); last console lines:"
        tail -25 "$2"; exit 1
    fi
    if grep -aq "^TESTBED FAIL" "$2" || ! grep -aq "^TESTBED PASS" "$2"; then
        echo "$1: FAILED"; exit 1
    fi
    echo "$1: all $(grep -ac '^TESTBED PASS' "$2") checks passed"
}
