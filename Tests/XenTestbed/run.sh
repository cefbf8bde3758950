#!/bin/bash
# The Xen testbed: Debian 12's current Xen 4.17 with a Debian dom0 under QEMU (TCG, with AMD
# SVM and nested paging so Xen has HAP), small PVH and HVM guests, and Xen's own `xl remus -F -n`
# as the baseline remusd is measured against. Builds everything from Debian packages into a cache
# outside git, boots, runs Tests/XenTestbed/xen-tests.sh in dom0 (its guest sections once per
# guest kind), powers off, prints the verdict lines and one result table per guest kind; exits 0
# only if every check passed.
#
#   bash Tests/XenTestbed/run.sh
#
# Environment (defaults in brackets):
#   REMUSD_XEN_TESTBED_RELEASE        4.17 (Debian 12) or 4.20 (Debian 13: trixie dom0, kernel 6.12; remusd
#                                     built against trixie's libxen-dev) [4.17]; see release.sh
#   REMUSD_XEN_TESTBED_GUESTS         guest kinds, space-separated: pvh, hvm, pv [pvh hvm]; pv boots
#                                     separately on a hypervisor with shadow paging (skipped when none is left)
#   REMUSD_XEN_TESTBED_CACHE          build directory, outside git [~/.cache/remusd-xen-testbed; 4.20: its xen-4.20/]
#   REMUSD_XEN_TESTBED_KERNEL         dom0 and guest kernel version [newest /boot/vmlinuz-* with modules]
#   REMUSD_XEN_TESTBED_TIMEOUT        seconds before a QEMU is killed [the dom0 watchdog's limit + 120]
#   REMUSD_XEN_TESTBED_REMUS_SECONDS  how long `xl remus` and remusd protect the guest before the kill [20]
#   REMUSD_XEN_TESTBED_INTERVAL_MS    checkpoint interval of `xl remus -i` and `remusd protect --interval`, ms [200]
#   REMUSD_XEN_TESTBED_XL=0           leave out the `xl remus` baseline (remusd's tests only)
#   REMUSD_XEN_TESTBED_SYNC_ROUNDS    rounds of the first-synchronisation benchmark, xl remus and remusd
#                                     over plaintext alternating (median and range in the table; 0: none) [5]
#   REMUSD_XEN_TESTBED_SYNC_BEFORE    an earlier remusd binary to take turns in those rounds (A/B of a change)
#   REMUSD_XEN_TESTBED_QEMU           the qemu-system-x86_64 to boot with [the host's, from PATH]
#   REMUSD_XEN_TESTBED_TCG_THREADS    QEMU's TCG threading: multi (a host thread per vCPU) or single [multi]
#   REMUSD_XEN_TESTBED_MAIN_CHANNEL   remusd's main protection (the one measured beside xl remus) over
#                                     tls or plain [tls]; for experiments, with MAIN_EXTRA
#   REMUSD_XEN_TESTBED_MAIN_EXTRA     more arguments for that `remusd protect`, e.g. "--unsafe --no-netbuf"
#   REMUSD_XEN_TESTBED_DISK=0         leave out the replicated-disk test (xen-disk-tests.sh) [1]
#   REMUSD_XEN_TESTBED_DISK_BENCH=1   add the guest's disk benchmark: fsync latency and throughput on a
#                                     loop device against served and protected by remusd (a table) [0]
#   REMUSD_XEN_TESTBED_HYPERVISOR     hypervisor package version for PVH/HVM [libxen-dev's]
#   REMUSD_XEN_TESTBED_PV_HYPERVISOR  hypervisor package version for PV [newest with shadow paging]
#   REMUSD_XEN_TESTBED_MIRROR         Debian mirror for debootstrap [the host's first Debian apt source]
#   REMUSD_XEN_TESTBED_SKIP_BUILD=1   reuse the cached remusd build instead of running swift build
#   REMUSD_XEN_TESTBED_SWIFT_TESTS=0  leave the RemusXenTests bundle out of dom0
#   REMUSD_XEN_TESTBED_BUILD_ONLY=1   build the images, do not boot
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${REMUSD_XEN_TESTBED_CACHE:-$HOME/.cache/remusd-xen-testbed}
remus_seconds=${REMUSD_XEN_TESTBED_REMUS_SECONDS:-20}
interval_ms=${REMUSD_XEN_TESTBED_INTERVAL_MS:-200}
xl_baseline=${REMUSD_XEN_TESTBED_XL:-1}
sync_rounds=${REMUSD_XEN_TESTBED_SYNC_ROUNDS:-5}
sync_before=${REMUSD_XEN_TESTBED_SYNC_BEFORE:-}
[ -z "$sync_before" ] || [ -x "$sync_before" ] || { echo "xen-testbed: REMUSD_XEN_TESTBED_SYNC_BEFORE=$sync_before is not an executable remusd" >&2; exit 2; }
guests=${REMUSD_XEN_TESTBED_GUESTS:-pvh}

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

t_start=$(date +%s.%N)
# shellcheck source=../TestbedLib/initramfs.sh
. "$here/../TestbedLib/initramfs.sh"
elapsed() { testbed_elapsed "$1"; }
say() { echo "xen-testbed: $*"; }
die() { echo "xen-testbed: $*" >&2; exit 2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap and chroot need it"
# shellcheck source=release.sh
. "$here/release.sh"   # suite, xen_series, the package names, qemu_cpu, release_prepare
for kind in $guests; do
    case "$kind" in pv|pvh|hvm) ;; *) die "REMUSD_XEN_TESTBED_GUESTS: unknown guest kind '$kind' (pv, pvh, hvm)" ;; esac
done
# PVH and HVM share one boot (hardware-assisted paging); PV needs a hypervisor of its own.
hap_guests=$(for kind in $guests; do [ "$kind" = pv ] || echo "$kind"; done | xargs)
pv_guests=$(for kind in $guests; do [ "$kind" != pv ] || echo "$kind"; done | head -1)

# --- 1. Debian packages on the build host --------------------------------------------------
packages=(qemu-system-x86 debootstrap linux-image-amd64 busybox-static cpio kmod gzip
          libxen-dev libnl-3-dev libnl-route-3-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH="/opt/swift/usr/bin:$PATH"
mirror=${REMUSD_XEN_TESTBED_MIRROR:-$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null | head -1 | tr -d ' ' || true)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
release_prepare

# The Xen version is the one remusd is built against (libxen-dev); dom0's tools are pinned to
# exactly that version, and so is the hypervisor PVH and HVM guests run on.
xen_version=${release_xen_version:-$(dpkg-query -W -f='${Version}' libxen-dev)}
case "$xen_version" in "$xen_series".*) ;; *) die "libxen-dev is $xen_version; this testbed needs Xen $xen_series" ;; esac

# --- 2. Kernel (dom0 and guest run the same Debian kernel) ---------------------------------
if [ -n "$release_kver" ]; then
    kver=$release_kver
elif [ -n "${REMUSD_XEN_TESTBED_KERNEL:-}" ]; then
    kver=$REMUSD_XEN_TESTBED_KERNEL
else
    kver=$(for v in /boot/vmlinuz-*; do v=${v#/boot/vmlinuz-}; [ -d "/lib/modules/$v" ] && echo "$v"; done | sort -V | tail -1)
fi
vmlinuz=${release_vmlinuz:-/boot/vmlinuz-$kver}
modules_base=${release_modules_base:-/}   # modprobe -d: where lib/modules/<version> is
[ -n "$kver" ] && [ -r "$vmlinuz" ] || die "no readable /boot/vmlinuz-<version> with /lib/modules/<version>; apt-get install linux-image-amd64"
say "Xen $xen_version, kernel $kver"

# --- 3. The hypervisors: extracted from their package, never installed ----------------------
# PVH and HVM guests are checkpointed through hardware-assisted paging (HAP): QEMU's TCG offers
# it with -cpu qemu64,+svm,+npt, so they run on the hypervisor of libxen-dev's version, the one
# a current Debian host runs. PV guests need shadow paging (PV log-dirty mode is built on it),
# and Debian's current security updates are built without CONFIG_SHADOW_PAGING (XSA-495: shadow
# paging deprecated): PV boots on the newest package version whose config still enables it,
# while the archive has one. The hypercall interface is the same across a series.
extract_hypervisor() {  # version → $cache/xen-<version>.elf and .config
    local v=$1 debs=$cache/debs
    [ -s "$cache/xen-$v.elf" ] && [ -s "$cache/xen-$v.config" ] && return 0
    rm -rf "$debs" && mkdir -p "$debs"
    (cd "$debs" && apt-get download "$hv_package=$v" > "$cache/download.log" 2>&1) \
        || { rm -rf "$debs"; say "apt-get download $hv_package=$v failed (see $cache/download.log)"; return 1; }
    dpkg -x "$debs/$hv_package"_*.deb "$debs/x"
    cp "$debs/x/$hv_image.config" "$cache/xen-$v.config"
    # QEMU's -kernel loads the ELF32 multiboot image directly: no GRUB, no ISO.
    zcat "$debs/x/$hv_image.gz" > "$cache/xen-$v.elf.tmp" && mv "$cache/xen-$v.elf.tmp" "$cache/xen-$v.elf"
    rm -rf "$debs"
    say "hypervisor extracted: $hv_package $v"
}
hv_version=""
if [ -n "$hap_guests" ]; then
    if [ -n "$release_hv_version" ]; then
        hv_version=$release_hv_version   # release_prepare extracted it
    else
        hv_version=${REMUSD_XEN_TESTBED_HYPERVISOR:-$xen_version}
        extract_hypervisor "$hv_version" || die "no $hv_package $hv_version for $hap_guests guests"
    fi
    say "hypervisor $hv_version, dom0 tools $xen_version"
fi
say "QEMU -cpu $qemu_cpu ($("${REMUSD_XEN_TESTBED_QEMU:-qemu-system-x86_64}" --version 2>&1 | head -1))"
pv_hv_version=""; pv_skip=""
if [ -n "$pv_guests" ] && [ -n "$release_pv_skip" ]; then
    pv_skip=$release_pv_skip
elif [ -n "$pv_guests" ]; then
    pv_pick=$cache/pv-hypervisor.version
    if [ -n "${REMUSD_XEN_TESTBED_PV_HYPERVISOR:-}" ]; then
        pv_hv_version=$REMUSD_XEN_TESTBED_PV_HYPERVISOR
        extract_hypervisor "$pv_hv_version" || die "no $hv_package $pv_hv_version (REMUSD_XEN_TESTBED_PV_HYPERVISOR)"
    elif [ -s "$pv_pick" ] && [ -s "$cache/xen-$(cat "$pv_pick").elf" ]; then
        pv_hv_version=$(cat "$pv_pick")
    else
        for v in $(apt-cache madison "$hv_package" | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | sort -Vru); do
            extract_hypervisor "$v" || continue
            if grep -q "^CONFIG_SHADOW_PAGING=y" "$cache/xen-$v.config"; then pv_hv_version=$v; break; fi
            say "$hv_package $v is built without shadow paging: PV guests cannot be checkpointed on it"
        done
        [ -z "$pv_hv_version" ] || echo "$pv_hv_version" > "$pv_pick"
    fi
    if [ -n "$pv_hv_version" ]; then
        say "PV hypervisor $pv_hv_version (shadow paging), dom0 tools $xen_version"
    else
        pv_skip="PV guests: no $hv_package with shadow paging is left in the apt sources (PV log-dirty needs it; Debian builds $xen_version without, XSA-495); set REMUSD_XEN_TESTBED_PV_HYPERVISOR=<version> to use one from elsewhere"
    fi
fi

# --- 4. dom0 base image: debootstrap minbase + Xen's tools, trimmed -----------------------
# socat: the tests' UDP receiver for the guest's counter lines (busybox's nc has no UDP).
base_packages="kmod,iproute2,procps,busybox-static,psmisc,sysvinit-utils,socat"
xen_packages="$(for p in $dom0_xen_packages; do printf '%s=%s ' "$p" "$xen_version"; done)$dom0_dm_packages"

build_dom0_base() {
    local out=$1 root=$cache/dom0-root
    umount_chroot() { umount "$root/proc" 2>/dev/null || true; }
    umount_chroot
    rm -rf --one-file-system "$root"
    say "debootstrap $suite (minbase) from $mirror"
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$root" "$mirror" > "$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log"; die "debootstrap failed (log: $cache/debootstrap.log)"; }
    # The host's Debian sources, so Xen's tools come in exactly the version remusd links against.
    rm -f "$root"/etc/apt/sources.list.d/*
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && grep -q "debian" "$f" && cp "$f" "$root$f"
    done
    [ -z "$release_dom0_sources" ] || { rm -f "$root"/etc/apt/sources.list.d/*; echo "$release_dom0_sources" > "$root/etc/apt/sources.list"; }
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
    trap umount_chroot EXIT
    mount -t proc proc "$root/proc"
    { chroot "$root" apt-get update &&
      DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y --no-install-recommends $xen_packages; } \
        > "$cache/dom0-apt.log" 2>&1 || { umount_chroot; tail -20 "$cache/dom0-apt.log"; die "installing Xen's tools in dom0 failed (log: $cache/dom0-apt.log)"; }
    umount_chroot
    trap - EXIT
    rm -f "$root/usr/sbin/policy-rc.d"
    # Trim: documentation, locales, apt's caches, bytecode, the PV shim (no PV-in-PVH here);
    # hvmloader stays (HVM guests boot through it).
    rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,bash-completion} "$root"/var/cache/apt/* \
           "$root"/var/lib/apt/lists/* "$root"/usr/lib/xen-$xen_series/boot/xen-shim "$root"/var/log/*.log
    find "$root" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
    echo "dom0" > "$root/etc/hostname"
    # Guest consoles go to files (no tty in the testbed), one line per write, timestamped.
    sed -i 's|^#\?XENCONSOLED_ARGS=.*||' "$root/etc/default/xen" 2>/dev/null || true
    echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console --timestamp=all"' >> "$root/etc/default/xen"
    (cd "$root" && find . -xdev | sort) > "$out.files.tmp"
    (cd "$root" && find . -xdev -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$out.tmp"
    mv "$out.files.tmp" "$out.files" && mv "$out.tmp" "$out"
    rm -rf --one-file-system "$root"
}
base_hash=$( { echo "$release_dom0_sources $suite $mirror $xen_version $base_packages $xen_packages"; declare -f build_dom0_base; } | sha256sum | cut -c1-16)
dom0_base=$cache/dom0-base-$base_hash.cpio.gz
if [ -s "$dom0_base" ] && [ -s "$dom0_base.files" ]; then
    say "dom0 base cached ($(du -h "$dom0_base" | cut -f1))"
else
    t_base=$(date +%s.%N)
    build_dom0_base "$dom0_base"
    ls -1t "$cache"/dom0-base-*.cpio.gz | tail -n +2 | while read -r old; do rm -f "$old" "$old.files"; done
    say "dom0 base built: $(du -h "$dom0_base" | cut -f1) ($(elapsed "$t_base") s)"
fi


# --- 5. remusd (release) and the RemusXen tests (debug), in the testbed's own scratch path ----
t_build=$(date +%s.%N)
build=$cache/swift-build
# A release other than the build host's is built against its own libxen-dev headers.
swift_flags=(); [ -z "$release_headers" ] || swift_flags=(-Xcc "-I$release_headers")
if [ "${REMUSD_XEN_TESTBED_SKIP_BUILD:-0}" != 1 ]; then
    say "building remusd (release) in $build"
    if ! (cd "$repo" && swift build -c release --product remusd --scratch-path "$build" "${swift_flags[@]}" > "$cache/remusd-build.log" 2>&1); then
        grep -E "error:" "$cache/remusd-build.log" | sort -u | head -20
        echo "TESTBED FAIL: remusd did not build (full log: $cache/remusd-build.log)"
        exit 1
    fi
fi
remusd=$build/release/remusd
[ -x "$remusd" ] || die "no remusd binary at $remusd"
say "remusd ready ($(elapsed "$t_build") s)"
swift_tests=$build/debug/remusdPackageTests.xctest
if [ "${REMUSD_XEN_TESTBED_SWIFT_TESTS:-1}" = 1 ] && [ "${REMUSD_XEN_TESTBED_SKIP_BUILD:-0}" != 1 ]; then
    t_tests=$(date +%s.%N)
    # Other targets' tests may not build while they are being worked on; then dom0 runs
    # without the RemusXen tests and the verdict says so.
    if (cd "$repo" && swift build --build-tests --scratch-path "$build" "${swift_flags[@]}" > "$cache/swift-tests-build.log" 2>&1); then
        say "swift tests built ($(elapsed "$t_tests") s)"
    else
        say "swift tests did not build (see $cache/swift-tests-build.log); dom0 runs without them"
        rm -f "$swift_tests"
    fi
fi
[ "${REMUSD_XEN_TESTBED_SWIFT_TESTS:-1}" = 1 ] || swift_tests=/nonexistent

# --- 6. The guest's initramfs: busybox, xen-netfront, guest-init.sh, diskbench --------------
# Kernel modules with their dependencies in load order, decompressed (busybox insmod reads
# plain .ko files only); ext4 for the disk test's file system (with crc32c_generic, which it
# asks the crypto layer for: the guest has no modprobe to load it then). diskbench.c is built
# static with the Swift toolchain's clang.
guest_hash=$( { echo "$kver $modules_base"; sha256sum "$here/guest-init.sh" "$here/diskbench.c" /bin/busybox "$here/../TestbedLib/initramfs.sh"; } | sha256sum | cut -c1-16)
guest_initrd=$cache/guest-$guest_hash.cpio.gz
if [ ! -s "$guest_initrd" ]; then
    root=$cache/guest-root
    rm -rf --one-file-system "$root" && mkdir -p "$root"/{bin,proc,sys,dev,tmp}
    cp /bin/busybox "$root/bin/busybox"
    "$(dirname "$(command -v swiftc)")/clang" -static -O2 -o "$root/bin/diskbench" "$here/diskbench.c"
    TESTBED_MODULES_BASE=$modules_base testbed_collect_modules "$root" "$kver" xen-netfront xen-blkfront crc32c_generic ext4
    cp "$here/guest-init.sh" "$root/init" && chmod +x "$root/init"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) > "$guest_initrd.tmp"
    mv "$guest_initrd.tmp" "$guest_initrd"
    rm -rf --one-file-system "$root"
    ls -1t "$cache"/guest-*.cpio.gz | tail -n +2 | xargs -r rm -f
    say "guest initramfs built: $(du -h "$guest_initrd" | cut -f1)"
fi

# --- 7. dom0 overlay: kernel modules, remusd and its libraries, the guest, the scripts -------
# Appended to the base as a second cpio archive: the kernel unpacks both into one root.
dom0_modules=(xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-netback xen-blkback
              bridge ifb sch_plug sch_ingress act_mirred cls_u32 tun loop nbd
              virtio_pci virtio_net)   # the two-host mode's wire (two-hosts.sh)
overlay_hash=$( {
    echo "$kver $base_hash $remus_seconds $interval_ms $xl_baseline $sync_rounds ${dom0_modules[*]}"
    echo "${REMUSD_XEN_TESTBED_MAIN_CHANNEL:-tls} ${REMUSD_XEN_TESTBED_MAIN_EXTRA:-} ${REMUSD_XEN_TESTBED_DISK:-1} ${REMUSD_XEN_TESTBED_DISK_BENCH:-0}"
    if [ -n "$sync_before" ]; then sha256sum "$sync_before"; fi
    sha256sum "$vmlinuz" "$remusd" "$guest_initrd" "$here/dom0-init.sh" "$here/dom0-lib.sh" "$here/xen-tests.sh" "$here/xen-guest-tests.sh" "$here/xen-disk-tests.sh" "$here/host-role.sh" "$here/run.sh" "$here/release.sh" "$here/../TestbedLib/initramfs.sh"
    if [ -x "$swift_tests" ]; then sha256sum "$swift_tests"; fi
} | sha256sum | cut -c1-16)
overlay=$cache/dom0-overlay-$overlay_hash.cpio.gz
if [ -s "$overlay" ]; then
    say "dom0 overlay cached"
else
    t_overlay=$(date +%s.%N)
    root=$cache/overlay-root
    rm -rf --one-file-system "$root" && mkdir -p "$root/usr/lib/modules/$kver" "$root/guest" "$root/usr/bin" "$root/etc/xen"
    # Modules at their usual place (the base is merged-/usr: /lib is /usr/lib), for modprobe.
    for m in "${dom0_modules[@]}"; do
        modprobe -d "$modules_base" --show-depends -S "$kver" "$m" | while read -r kind path _; do
            [ "$kind" = insmod ] || continue
            rel=${path#*/lib/modules/$kver/}
            mkdir -p "$root/usr/lib/modules/$kver/$(dirname "$rel")"
            cp "$path" "$root/usr/lib/modules/$kver/$rel"
        done
    done
    cp "$modules_base/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/usr/lib/modules/$kver/" 2>/dev/null || true
    depmod -b "$root/usr" "$kver" 2>/dev/null || depmod -b "$root" "$kver"
    # Binaries with every shared library the base lacks, each at its canonical path (RUNPATH
    # and the loader's default directories find them without an ld.so.cache entry).
    add_with_libs() {
        local bin=$1 dest=$2
        cp -L "$bin" "$root$dest"
        testbed_shared_libs "$bin" | while read -r lib; do
            canon=$(readlink -f "$lib"); dir=$(dirname "$lib")
            case "$dir" in /lib|/lib/*|/lib64|/lib64/*) dir=/usr$dir ;; esac
            name=$(basename "$lib")
            grep -qxF ".$dir/$name" "$dom0_base.files" && continue
            mkdir -p "$root$dir"
            [ -e "$root$dir/$name" ] || cp "$canon" "$root$dir/$name"
        done
    }
    add_with_libs "$remusd" /usr/bin/remusd
    # One throwaway CA for the replication channel's mutual TLS, shared by both hosts of two-hosts.sh.
    "$remusd" certs "$root/usr/share/remusd/tls" primary backup > /dev/null
    [ -x "$swift_tests" ] && add_with_libs "$swift_tests" /usr/bin/remusd-tests
    [ -z "$sync_before" ] || add_with_libs "$sync_before" /usr/bin/remusd-before
    cp "$vmlinuz" "$root/guest/vmlinuz"
    cp "$guest_initrd" "$root/guest/initrd.cpio.gz"
    cp "$here/dom0-init.sh" "$root/init"
    cp "$here/xen-tests.sh" "$root/xen-tests.sh"
    cp "$here/xen-guest-tests.sh" "$root/xen-guest-tests.sh"
    cp "$here/xen-disk-tests.sh" "$root/xen-disk-tests.sh"
    cp "$here/host-role.sh" "$root/host-role.sh"
    cp "$here/dom0-lib.sh" "$root/dom0-lib.sh"
    chmod +x "$root/init" "$root/xen-tests.sh" "$root/xen-guest-tests.sh" "$root/host-role.sh"
    printf 'REMUS_SECONDS=%s\nINTERVAL_MS=%s\nXL_BASELINE=%s\nMAIN_CHANNEL=%s\nMAIN_EXTRA=%q\nSYNC_ROUNDS=%s\nDISK_TESTS=%s\nDISK_BENCH=%s\n' "$remus_seconds" "$interval_ms" "$xl_baseline" \
        "${REMUSD_XEN_TESTBED_MAIN_CHANNEL:-tls}" "${REMUSD_XEN_TESTBED_MAIN_EXTRA:-}" "$sync_rounds" "${REMUSD_XEN_TESTBED_DISK:-1}" \
        "${REMUSD_XEN_TESTBED_DISK_BENCH:-0}" > "$root/xen-testbed.conf"
    # Only entries below usr/, guest/ and the top-level files: never a directory entry that
    # would collide with the base's /lib -> usr/lib symlink.
    (cd "$root" && find . -mindepth 1 -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$overlay.tmp"
    mv "$overlay.tmp" "$overlay"
    rm -rf --one-file-system "$root"
    ls -1t "$cache"/dom0-overlay-*.cpio.gz | tail -n +3 | xargs -r rm -f   # keep the two newest
    say "dom0 overlay built: $(du -h "$overlay" | cut -f1) ($(elapsed "$t_overlay") s)"
fi
dom0_initrd=$cache/dom0.cpio.gz
cat "$dom0_base" "$overlay" > "$dom0_initrd"
say "dom0 initramfs: $(du -h "$dom0_initrd" | cut -f1) (base + overlay)"
[ "${REMUSD_XEN_TESTBED_BUILD_ONLY:-0}" = 1 ] && { say "built; not booting (REMUSD_XEN_TESTBED_BUILD_ONLY=1)"; exit 0; }

# --- 8. Boot Xen and dom0 under QEMU (TCG) -------------------------------------------------
# TCG, not KVM: this machine's KVM cannot emulate Xen's shadow-stack instructions, and it was
# slower anyway. One QEMU at a time on this machine (the lock), at low priority.
dom0_args="console=hvc0 earlyprintk=xen loglevel=4"
# The dom0 watchdog's limit for a boot with $1 guest kinds: per kind the xl baseline and remusd's
# sections, each protecting for REMUS_SECONDS, with room for slow first synchronisations: a quiet
# machine needs ~8 minutes per kind, one that other work loads (load 8-11 on 2 cores) ~21.
watchdog_s() { echo $(( 120 + $1 * (2 * remus_seconds + 1800) )); }
boots_s=0
# Boots one hypervisor with dom0 running xen-tests.sh for the guest kinds $3 (space-separated);
# console in $2. Sets qemu_status, boot_timeout and the QEMU time, adds it to boots_s.
boot_xen() {
    local elf=$1 log=$2 kinds=$3 n limit t_lock t_boot
    n=$(echo "$kinds" | wc -w)
    limit=$(watchdog_s "$n")
    boot_timeout=${REMUSD_XEN_TESTBED_TIMEOUT:-$((limit + 120))}
    local xen_args="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all dom0_mem=1536M,max:1536M dom0_max_vcpus=2 console_timestamps=boot"
    rm -f "$log" "$log.txt"
    say "waiting for the QEMU lock (/tmp/remusd-qemu.lock)"
    t_lock=$(date +%s.%N)
    set +e
    flock /tmp/remusd-qemu.lock bash -c '
        echo "xen-testbed: booting Xen under QEMU (TCG) after $(awk -v a="$1" -v b="$(date +%s.%N)" "BEGIN { printf \"%.0f\", b - a }") s waiting; guests: $9; console in $2"
        date +%s.%N > "$2.boot-start"
        exec nice -n 10 timeout "$3" "${REMUSD_XEN_TESTBED_QEMU:-qemu-system-x86_64}" -accel "tcg,thread=${REMUSD_XEN_TESTBED_TCG_THREADS:-multi}" -cpu "${10}" -m 4G -smp 2 \
            -display none -monitor none -no-reboot -nic none -serial "file:$2" \
            -kernel "$4" -append "$5" -initrd "$6 $7 testbed_guests=${9// /+} testbed_watchdog=${11},$8"' \
        _ "$t_lock" "$log" "$boot_timeout" "$elf" "$xen_args" "$vmlinuz" "$dom0_args" "$dom0_initrd" "$kinds" "$qemu_cpu" "$limit"
    qemu_status=$?
    set -e
    t_boot=$(cat "$log.boot-start" 2>/dev/null || echo "$t_lock")
    boot_run_s=$(elapsed "$t_boot")
    boots_s=$(awk -v a="$boots_s" -v b="$boot_run_s" 'BEGIN { printf "%.0f", a + b }')
    [ -f "$log" ] || die "QEMU wrote no console log (exit status $qemu_status)"
    tr -d '\r' < "$log" > "$log.txt"
}

# --- 9. Verdicts and one result table per guest kind --------------------------------------
# xen-tests.sh starts each kind's lines with "TESTBED KIND <kind>"; its metrics are read from
# that part of the console only.
kind_part() { awk -v k="$2" '/^TESTBED KIND / { on = ($3 == k) } /^TESTBED DONE/ { on = 0 } on' "$1"; }
row() { printf '  %-52s %12s  %s\n' "$1" "${2:-—}" "$3"; }
row2() { printf '  %-56s %18s %18s  %s\n' "$1" "${2:-—}" "${3:-—}" "$4"; }
# Prints the tables of guest kind $2 from console $1 (its hypervisor version $3).
kind_tables() {
    local part; part=$(mktemp)
    kind_part "$1" "$2" > "$part"
    metric() { sed -n "s/^TESTBED METRIC $1 \([^ ]*\).*/\1/p" "$part" | tail -1; }
    local kind_name; kind_name=$(echo "$2" | tr a-z A-Z)
    local booted; booted=$(sed -n 's/.*TESTBED BOOTED uptime=\([0-9.]*\).*/\1/p' "$1" | head -1)
    local asked; asked=$(awk -v i="$interval_ms" 'BEGIN { printf "%.1f", 1000 / i }')
    echo
    echo "$kind_name guest (128 MiB, 1 vCPU): Xen's own Remus (xl remus -F -n -i $interval_ms, no network buffering),"
    echo "hypervisor $3, dom0 tools $xen_version ($suite, kernel $kver), QEMU TCG ($qemu_cpu) with 2 vCPUs"
    row "measure" "value" "unit"
    row "dom0 kernel to /init (dom0 uptime)" "$booted" "s"
    row "Xen's services started (/etc/init.d/xen start)" "$(sed -n 's/^TESTBED METRIC xen_services_s \([^ ]*\).*/\1/p' "$1" | head -1)" "s"
    row "xl create of the guest" "$(metric xl_create_s)" "s"
    row "guest counter seen after xl create" "$(metric guest_counter_s)" "s"
    row "guest counter rate, unprotected" "$(metric counter_rate_free)" "1/s"
    row "xl remus start to first checkpoint (live pre-copy)" "$(metric remus_sync_s)" "s"
    row "protected for" "$(metric protected_s)" "s"
    row "checkpoints taken" "$(metric checkpoints)" ""
    row "checkpoints per second (asked: $asked)" "$(metric checkpoints_per_s)" "1/s"
    row "time between checkpoints, mean" "$(metric checkpoint_gap_ms)" "ms"
    row "time between checkpoints, max" "$(metric checkpoint_gap_max_ms)" "ms"
    row "pages sent per checkpoint, mean" "$(metric pages_per_checkpoint)" "4 KiB pages"
    row "guest counter rate, protected" "$(metric counter_rate_protected)" "1/s"
    row "failover: kill to the receiver seeing the stream end" "$(metric failover_stream_broken_s)" "s"
    row "failover: kill to xl reporting \"Remus Failover\"" "$(metric failover_noticed_s)" "s"
    row "failover: kill to backup unpaused" "$(metric failover_running_s)" "s"
    row "failover: kill to guest answering TCP on the backup" "$(metric failover_answer_s)" "s"
    row "guest counter before kill / after failover" "$(metric counter_before_kill) / $(metric counter_after_failover)" ""
    row "counter lines printed again by the backup" "$(metric counter_repeated)" "lines"
    echo
    # Side by side: the same guest, the same interval, the same length of protection, one run.
    local gap_over; gap_over=$(awk -v g="$(metric checkpoint_gap_ms)" -v i="$interval_ms" 'BEGIN { if (g != "") printf "%.0f", g - i }')
    echo "$kind_name side by side: xl remus -F -n -i $interval_ms and remusd protect --interval $interval_ms (netbuf on the vif), backup on the same dom0"
    row2 "measure" "xl remus" "remusd" "unit"
    row2 "start to first checkpoint (live pre-copy of 128 MiB)" "$(metric remus_sync_s)" "$(metric remusd_sync_s)" "s"
    row2 "  the same, remusd over plaintext as xl (-s \"\")" "$(metric remus_sync_s)" "$(metric remusd_sync_plain_s)" "s"
    if [ -n "$(metric remusd_live_median_s)" ]; then
        row2 "first sync, plaintext, median of $(metric sync_rounds): live pre-copy" "$(metric remus_sync_median_s)" "$(metric remusd_live_median_s)" "s"
        row2 "  min…max" "$(metric remus_sync_range)" "$(metric remusd_live_range)" "s"
        row2 "  to the first checkpoint's ACK (xl has none)" "—" "$(metric remusd_ack_median_s) ($(metric remusd_ack_range))" "s"
    fi
    row2 "progress bar's time left, largest error" "" "$(metric remusd_eta_error_pct)" "%"
    row2 "pause p50: suspend / capture / resume" "" "$(metric remusd_pause_split)" "ms"
    row2 "checkpoints per second (asked: $asked)" "$(metric checkpoints_per_s)" "$(metric remusd_checkpoints_per_s)" "1/s"
    row2 "guest counter rate, protected (unprotected: $(metric counter_rate_free))" "$(metric counter_rate_protected)" "$(metric remusd_counter_rate)" "1/s"
    row2 "pause per checkpoint, p50 / p99 (xl: gap - interval)" "${gap_over:+~$gap_over}" "$(metric remusd_pause_p50_ms) / $(metric remusd_pause_p99_ms)" "ms"
    row2 "ping round trip while protected (unprotected: $(metric free_ping_rtt_ms))" "" "$(metric remusd_ping_rtt_ms)" "ms"
    row2 "failover: kill to the guest answering TCP" "$(metric failover_answer_s)" "$(metric remusd_failover_answer_s)" "s"
    row2 "failover: primary domain destroyed, to the guest answering" "$([ "$xl_baseline" = 1 ] && echo none)" "$(metric remusd_destroy_answer_s)" "s"
    row2 "planned switchover: command to the guest answering" "$([ "$xl_baseline" = 1 ] && echo none)" "$(metric remusd_switchover_answer_s)" "s"
    row2 "counter lines the outside received twice (UDP)" "$(metric udp_repeated)" "$(metric remusd_udp_repeated)" "lines"
    row2 "output held until the backup has the checkpoint" "$([ "$xl_baseline" = 1 ] && echo no)" "yes" ""
    echo "  (xl remus detects nothing but a broken stream: its failover starts at the kill; remusd's backup sees the closed connection (kill) or STREAM_END (destroy) at once, then runs the fence)"
    if [ -n "$(metric disk_remusd_fsync_p50_ms)" ]; then
        # Section 13 (REMUSD_XEN_TESTBED_DISK_BENCH=1): the guest's own disk benchmark.
        local m cells
        row3() { printf '  %-54s %22s %22s %22s  %s\n' "$1" "${2:-—}" "${3:-—}" "${4:-—}" "$5"; }
        ratio() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { if (a != "" && b > 0) printf f, a / b }'; }
        echo
        echo "$kind_name guest's disk (64 MiB image in dom0's RAM), timed in the guest: unprotected on a loop device; served by remusd"
        echo "with no backup (the NBD path and the journal alone); served and protected by remusd (--interval $interval_ms, backup on this dom0)"
        row3 "measure" "loop, unprotected" "remusd, no backup" "remusd, protected" "unit"
        cells=(); for m in loop served remusd; do cells+=("$(metric disk_${m}_fsync_p50_ms) ($(metric disk_${m}_fsync_p10_ms) / $(metric disk_${m}_fsync_p90_ms))"); done
        row3 "4 KiB write + fdatasync: p50 (p10 / p90) of 200" "${cells[@]}" "ms"
        cells=(); for m in loop served remusd; do cells+=("$(metric disk_${m}_seq_mbps) ($(metric disk_${m}_seq_range))"); done
        row3 "1 MiB writes, 16 MiB + fdatasync: median (range) of 5" "${cells[@]}" "MB/s"
        row3 "  against the loop device: fsync p50 / MB/s" "1" \
            "$(ratio "$(metric disk_served_fsync_p50_ms)" "$(metric disk_loop_fsync_p50_ms)" '%.2f×') / $(ratio "$(metric disk_served_seq_mbps)" "$(metric disk_loop_seq_mbps)" '%.2f')" \
            "$(ratio "$(metric disk_remusd_fsync_p50_ms)" "$(metric disk_loop_fsync_p50_ms)" '%.2f×') / $(ratio "$(metric disk_remusd_seq_mbps)" "$(metric disk_loop_seq_mbps)" '%.2f')" ""
    fi
    rm -f "$part"
}

# PVH and HVM in one boot on the current hypervisor; PV in its own boot on one with shadow paging.
logs=(); hypervisors=(); boot_kinds=()
if [ -n "$hap_guests" ]; then
    logs+=("$cache/console.log"); hypervisors+=("$hv_version"); boot_kinds+=("$hap_guests")
fi
if [ -n "$pv_hv_version" ]; then
    logs+=("$cache/console-pv.log"); hypervisors+=("$pv_hv_version"); boot_kinds+=("pv")
fi
statuses=(); timeouts=()
for i in "${!logs[@]}"; do
    boot_xen "$cache/xen-${hypervisors[$i]}.elf" "${logs[$i]}" "${boot_kinds[$i]}"
    statuses+=("$qemu_status"); timeouts+=("$boot_timeout")
    say "QEMU with ${boot_kinds[$i]} ran $boot_run_s s"
done
failed=0
for i in "${!logs[@]}"; do
    echo
    echo "xen-testbed: ${boot_kinds[$i]} on hypervisor ${hypervisors[$i]}:"
    # The verdicts, and the logs and diagnoses dom0 showed with them (indented "--- " and "| "
    # lines): on a CI machine the console log stays behind, so a failure must explain itself here.
    grep -aE "^TESTBED (PASS|FAIL|INFO|SKIP)|^    (--- |\| )" "${logs[$i]}.txt" || true
done
[ -z "$pv_skip" ] || echo "TESTBED SKIP: $pv_skip"
for i in "${!logs[@]}"; do
    for kind in ${boot_kinds[$i]}; do kind_tables "${logs[$i]}.txt" "$kind" "${hypervisors[$i]}"; done
done
echo
echo "xen-testbed: timing: total $(elapsed "$t_start") s, QEMU $boots_s s"
for i in "${!logs[@]}"; do
    ( testbed_verdict "xen-testbed (${boot_kinds[$i]})" "${logs[$i]}.txt" "${statuses[$i]}" "${timeouts[$i]}" ) || failed=1
done
[ ${#logs[@]} -gt 0 ] || { echo "TESTBED FAIL: no guest kind could be tested (REMUSD_XEN_TESTBED_GUESTS=$guests)"; failed=1; }
exit $failed
