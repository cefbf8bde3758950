#!/bin/bash
# The netbuf testbed: boots Debian's own kernel under QEMU (TCG) with a busybox initramfs that
# holds the kernel modules for output buffering, iproute2 (to build namespaces and to inspect),
# a release build of remusd, and the tests (Tests/Testbed/guest-tests.sh). Prints the verdict
# lines and timings; exits 0 only if every test passed.
#
#   bash Tests/Testbed/run.sh
#
# Environment:
#   REMUSD_TESTBED_CACHE    build directory, outside git (default: ~/.cache/remusd-testbed)
#   REMUSD_TESTBED_KERNEL   kernel version to boot (default: the newest /boot/vmlinuz-* with modules)
#   REMUSD_TESTBED_TIMEOUT  seconds before QEMU is killed (default: 900)
#   REMUSD_TESTBED_SKIP_BUILD=1  reuse the cached remusd binary instead of running swift build
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${REMUSD_TESTBED_CACHE:-$HOME/.cache/remusd-testbed}
timeout_s=${REMUSD_TESTBED_TIMEOUT:-900}
mkdir -p "$cache"

t_start=$(date +%s.%N)
# shellcheck source=../TestbedLib/initramfs.sh
. "$here/../TestbedLib/initramfs.sh"
elapsed() { testbed_elapsed "$1"; }
say() { echo "testbed: $*"; }
die() { echo "testbed: $*" >&2; exit 2; }

# --- 1. Debian packages ------------------------------------------------------------------
packages=(linux-image-amd64 busybox-static qemu-system-x86 cpio kmod iproute2 xz-utils zstd gzip
          libnl-3-dev libnl-route-3-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
    else sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; fi
fi

# --- 2. Kernel --------------------------------------------------------------------------
if [ -n "${REMUSD_TESTBED_KERNEL:-}" ]; then
    kver=$REMUSD_TESTBED_KERNEL
else
    kver=$(for v in /boot/vmlinuz-*; do v=${v#/boot/vmlinuz-}; [ -d "/lib/modules/$v" ] && echo "$v"; done | sort -V | tail -1)
fi
[ -n "$kver" ] && [ -r "/boot/vmlinuz-$kver" ] || die "no readable /boot/vmlinuz-<version> with /lib/modules/<version>; apt-get install linux-image-amd64"
vmlinuz=/boot/vmlinuz-$kver
say "kernel $kver"

# --- 3. remusd, release build -----------------------------------------------------------
t_build=$(date +%s.%N)
if [ "${REMUSD_TESTBED_SKIP_BUILD:-0}" != 1 ]; then
    say "building remusd (release) in $cache/swift-build"
    if ! (cd "$repo" && swift build -c release --product remusd --scratch-path "$cache/swift-build" > "$cache/remusd-build.log" 2>&1); then
        grep -E "error:" "$cache/remusd-build.log" | sort -u | head -20
        echo "TESTBED FAIL: remusd did not build (full log: $cache/remusd-build.log)"
        exit 1
    fi
fi
remusd=$cache/swift-build/release/remusd
[ -x "$remusd" ] || die "no remusd binary at $remusd"
say "remusd ready ($(elapsed "$t_build") s)"

# The package's Swift tests too (debug build): RemusNetbufTests then runs its sch_plug suite,
# which the build machine's kernel skips. Other targets' tests may not build while they are
# being worked on; then only the shell tests run, and the verdict says so.
swift_tests=$cache/swift-build/debug/remusdPackageTests.xctest
if [ "${REMUSD_TESTBED_SWIFT_TESTS:-1}" = 1 ] && [ "${REMUSD_TESTBED_SKIP_BUILD:-0}" != 1 ]; then
    t_tests=$(date +%s.%N)
    if (cd "$repo" && swift build --build-tests --scratch-path "$cache/swift-build" > "$cache/swift-tests-build.log" 2>&1); then
        say "swift tests built ($(elapsed "$t_tests") s)"
    else
        say "swift tests did not build (see $cache/swift-tests-build.log); running the shell tests only"
        rm -f "$swift_tests"
    fi
fi
[ "${REMUSD_TESTBED_SWIFT_TESTS:-1}" = 1 ] || rm -f "$swift_tests"

# --- 4. initramfs, rebuilt when an input changes ----------------------------------------
modules=(ifb sch_plug sch_ingress act_mirred cls_u32 veth bridge tun nbd)
# Loaded by the kTLS check only (lib/modules-load/order-ktls), after the drills: tls needs the
# kernel's AES-GCM for the keys OpenSSL hands it, and gcm, ctr and ghash are modules in Debian's
# kernel that the kernel would load on demand through a modprobe this initramfs does not have.
# Loaded at boot they would put the drills' TLS on the emulated CPU's software AES in the kernel,
# slower here than OpenSSL's own.
ktls_modules=(tls gcm ctr ghash_generic)
inputs_hash=$( {
    echo "$kver"; sha256sum "$vmlinuz" "$remusd" "$here/init.sh" "$here/guest-tests.sh" "$here/run.sh" "$here/../TestbedLib/initramfs.sh"
    if [ -x "$swift_tests" ]; then sha256sum "$swift_tests"; fi
    dpkg-query -W busybox-static iproute2 libnl-3-200 libnl-route-3-200 libc6 2>/dev/null
    echo "${modules[*]} / ${ktls_modules[*]}"
} | sha256sum | cut -c1-16)
initrd=$cache/initramfs-$inputs_hash.cpio.gz
if [ -f "$initrd" ]; then
    say "initramfs cached ($initrd)"
else
    t_initrd=$(date +%s.%N)
    root=$cache/root
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,var,lib/modules-load}
    ln -s ../run "$root/var/run"
    cp /bin/busybox "$root/bin/busybox"

    testbed_collect_modules "$root" "$kver" "${ktls_modules[@]}"
    mv "$root/lib/modules-load/order" "$root/lib/modules-load/order-ktls"
    testbed_collect_modules "$root" "$kver" "${modules[@]}"

    # Binaries with their shared libraries, each at its own path (RUNPATH and the loader's
    # system search path then find them without an ld.so.cache).
    copy_with_libs() {
        local bin=$1 dest=$2
        cp -L "$bin" "$root$dest"
        testbed_shared_libs "$bin" | while read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
        done
    }
    # /usr/sbin comes before busybox's own ip/tc applets in the guest's PATH.
    copy_with_libs "$(command -v ip)" /usr/sbin/ip
    copy_with_libs "$(command -v tc)" /usr/sbin/tc
    copy_with_libs "$remusd" /usr/bin/remusd
    [ -x "$swift_tests" ] && copy_with_libs "$swift_tests" /usr/bin/remusd-tests
    cp "$here/init.sh" "$root/init"
    cp "$here/guest-tests.sh" "$root/guest-tests.sh"
    chmod +x "$root/init" "$root/guest-tests.sh"
    echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$root"
    ls -1t "$cache"/initramfs-*.cpio.gz | tail -n +3 | xargs -r rm -f   # keep the two newest
    say "initramfs built: $(du -h "$initrd" | cut -f1) ($(elapsed "$t_initrd") s)"
fi

# --- 5. Boot ----------------------------------------------------------------------------
log=$cache/console.log
rm -f "$log"
say "booting under QEMU (TCG), console in $log"
t_boot=$(date +%s.%N)
set +e
# The CPU: qemu64 plus what a real host has and remusd uses — SSE4.2 (CRC32C), AES-NI and
# PCLMULQDQ (OpenSSL's AES-GCM: without them userspace TLS under TCG ran at ~5 MB/s, and the
# drills' initial synchronisation over TLS outlasted their deadlines).
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq -m 1G -smp 1 -nographic -no-reboot \
    -nic none -kernel "$vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" \
    -serial "file:$log" -monitor none
qemu_status=$?
set -e
run_s=$(elapsed "$t_boot")

# --- 6. Verdict -------------------------------------------------------------------------
[ -f "$log" ] || die "QEMU wrote no console log (exit status $qemu_status)"
tr -d '\r' < "$log" > "$log.txt"
grep -E "^TESTBED (PASS|FAIL|INFO|SKIP)" "$log.txt" || true
[ -x "$swift_tests" ] || echo "TESTBED SKIP: the package's Swift tests were not run inside the testbed (not built)"
booted=$(sed -n 's/.*TESTBED BOOTED uptime=\([0-9.]*\).*/\1/p' "$log.txt" | head -1)
echo "testbed: timing: total $(elapsed "$t_start") s, QEMU $run_s s (kernel to /init ${booted:-?} s guest time)"
testbed_verdict testbed "$log.txt" "$qemu_status" "$timeout_s"
