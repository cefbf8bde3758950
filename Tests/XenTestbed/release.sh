# The Debian and Xen release the Xen testbed boots, chosen by REMUSD_XEN_TESTBED_RELEASE:
#   4.17  Debian 12 (bookworm), the default: the build host's own libxen-dev, kernel and apt sources.
#   4.20  Debian 13 (trixie): its libxen-dev headers (remusd is built against them, so it opens
#         libxenctrl.so.4.20 and friends), its hypervisor (xen-hypervisor-4.20-amd64), its
#         kernel 6.12 for dom0 and guest, and a trixie dom0 with xen-utils-4.20 and
#         qemu-system-xen. The packages come from the same Debian mirror through a private apt
#         configuration and are unpacked with dpkg -x: nothing is installed on the build host.
# Sourced by run.sh (after `cache`, `say` and `die` exist); defines variables and functions, and
# gives 4.20 a cache of its own, $cache/xen-4.20 (run.sh keeps one dom0 base and guest per cache).
# Everything release-specific lives here, so run.sh reads the same for both.
#
# Both releases: suite, xen_series, hv_package, hv_image, dom0_xen_packages, dom0_dm_packages,
# qemu_cpu, release_pv_skip (why PV guests are skipped, empty when they can run).
# After `release_prepare` (4.20; for 4.17 every release_* value stays empty and run.sh uses its
# own defaults):
#   release_xen_version    the toolstack's package version: libxen-dev = xen-utils-4.20 = hypervisor
#   release_headers        the include directory remusd is built against (-Xcc -I)
#   release_kver, release_vmlinuz, release_modules_base
#                          the kernel, unpacked; its modules under <base>/lib/modules (modprobe -d)
#   release_hv_version     the hypervisor's package version; its multiboot ELF is $cache/xen-<it>.elf
#   release_dom0_sources   dom0's /etc/apt/sources.list

release=${REMUSD_XEN_TESTBED_RELEASE:-4.17}
case "$release" in
    4.17) suite=bookworm; xen_series=4.17 ;;
    4.20) suite=trixie; xen_series=4.20 ;;
    *) die "REMUSD_XEN_TESTBED_RELEASE=$release: the testbed boots 4.17 (Debian 12) or 4.20 (Debian 13)" ;;
esac
hv_package=xen-hypervisor-$xen_series-amd64      # the hypervisor, unpacked, never installed
hv_image=boot/xen-$xen_series-amd64              # in that package: .gz (the ELF) and .config
# dom0's toolstack, pinned to libxen-dev's version; qemu-system-xen is HVM's device model (libxl
# runs /usr/libexec/xen-qemu-system-i386) and brings SeaBIOS; hvmloader comes with xen-utils.
dom0_xen_packages="xen-utils-$xen_series xen-utils-common xenstore-utils"
dom0_dm_packages="qemu-system-xen"
# QEMU's CPU: qemu64 plus AMD SVM with nested paging gives Xen HAP (virt_caps: pv hvm hap), which
# PVH and HVM guests are checkpointed with; SSE4.2 (remusd's CRC32C), AES-NI and PCLMULQDQ
# (OpenSSL's AES-GCM on the replication channel) as real hosts have them.
qemu_cpu=qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq
# PV guests need shadow paging, which Debian builds 4.17's security updates without and 4.20
# entirely without: 4.17 looks for an older package that has it (run.sh), 4.20 skips PV.
release_pv_skip=""
[ "$release" = 4.17 ] || release_pv_skip="PV guests: Debian 13's $hv_package is built without shadow paging (PV log-dirty needs it; XSA-495), so no PV guest can be checkpointed on Xen $xen_series; PVH and HVM are"
release_xen_version="" release_headers="" release_kver="" release_vmlinuz="" release_modules_base=""
release_hv_version="" release_dom0_sources=""
if [ "$release" != 4.17 ]; then cache=$cache/xen-$release; mkdir -p "$cache"; fi

# apt-get and apt-cache against this release's sources only, lists and downloads under $cache/apt.
release_apt() {
    local tool=$1; shift
    timeout 600 "$tool" -o "Dir::Etc::sourcelist=$cache/apt/sources.list" -o Dir::Etc::sourceparts=- \
        -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt" -o Dir::State::status=/dev/null \
        -o APT::Sandbox::User=root "$@"
}

# Downloads one package (name or name=version) into $cache/debs once; prints the .deb's path.
release_deb() {
    local name=${1%%=*} deb
    deb=$(ls "$cache/debs/${name}_"*.deb 2>/dev/null | tail -1)
    case "$1" in *=*) [ -z "$deb" ] || [[ "$deb" == *"_${1#*=}_"* ]] || deb="" ;; esac
    if [ -z "$deb" ]; then
        rm -f "$cache/debs/${name}_"*.deb
        (cd "$cache/debs" && release_apt apt-get -qq download "$1") > "$cache/download.log" 2>&1 \
            || die "apt-get download $1 from $suite failed (see $cache/download.log)"
        deb=$(ls "$cache/debs/${name}_"*.deb | tail -1)
    fi
    echo "$deb"
}

release_prepare() {
    [ "$release" = 4.17 ] && return 0
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/archives/partial" "$cache/debs"
    local security=${mirror%/debian}/debian-security
    [ "$security" != "$mirror/debian-security" ] || security=http://deb.debian.org/debian-security
    release_dom0_sources="deb $mirror $suite main
deb $security $suite-security main"
    echo "$release_dom0_sources" | sed 's|^deb |deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] |' > "$cache/apt/sources.list"
    # The package lists are refreshed once a day (each run's versions then stay put).
    if [ -z "$(find "$cache/apt/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        say "apt-get update for $suite ($mirror)"
        release_apt apt-get -qq update > "$cache/apt-update.log" 2>&1 \
            || die "apt-get update for $suite failed (see $cache/apt-update.log)"
    fi

    # Headers: the toolstack version everything else is pinned to.
    local deb
    deb=$(release_deb libxen-dev)
    release_xen_version=$(dpkg-deb -f "$deb" Version)
    # One fixed path whatever the version: remusd's incremental build keys on its flags.
    release_headers=$cache/headers/usr/include
    if [ "$(cat "$cache/headers/version" 2>/dev/null)" != "$release_xen_version" ]; then
        rm -rf "$cache/headers" && dpkg -x "$deb" "$cache/headers" && echo "$release_xen_version" > "$cache/headers/version"
    fi

    # The hypervisor of exactly that version: QEMU's -kernel loads its ELF32 multiboot image.
    release_hv_version=${REMUSD_XEN_TESTBED_HYPERVISOR:-$release_xen_version}
    local elf=$cache/xen-$release_hv_version.elf
    if [ ! -s "$elf" ]; then
        deb=$(release_deb "xen-hypervisor-$xen_series-amd64=$release_hv_version")
        rm -rf "$cache/hv" && dpkg -x "$deb" "$cache/hv"
        zcat "$cache/hv/boot/xen-$xen_series-amd64.gz" > "$elf.tmp" && mv "$elf.tmp" "$elf"
        rm -rf "$cache/hv"
        say "hypervisor extracted: xen-hypervisor-$xen_series-amd64 $release_hv_version"
    fi

    # The kernel linux-image-amd64 points at (or REMUSD_XEN_TESTBED_KERNEL), with its modules.
    local image
    if [ -n "${REMUSD_XEN_TESTBED_KERNEL:-}" ]; then
        image=linux-image-$REMUSD_XEN_TESTBED_KERNEL
    else
        image=$(release_apt apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        [ -n "$image" ] || die "no kernel behind $suite's linux-image-amd64"
    fi
    release_kver=${image#linux-image-}
    release_modules_base=$cache/kernel-$release_kver/usr
    release_vmlinuz=$cache/kernel-$release_kver/boot/vmlinuz-$release_kver
    if [ ! -s "$release_modules_base/lib/modules/$release_kver/modules.dep" ]; then
        deb=$(release_deb "$image")
        rm -rf "$cache"/kernel-* && dpkg -x "$deb" "$cache/kernel-$release_kver"
        depmod -b "$release_modules_base" "$release_kver"
        rm -f "$deb"   # 100 MB; the unpacked tree is what the builds read
        say "kernel unpacked: $image"
    fi
}
