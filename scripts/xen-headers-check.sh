#!/usr/bin/env bash
# Builds the Xen backend (RemusXen, CXen) against Debian 13's libxen-dev (Xen 4.20) headers, so the
# one source tree stays buildable for both Debian releases: 4.17 (bookworm, this machine's
# libxen-dev) and 4.20 (trixie). The headers come from trixie's libxen-dev package, fetched with
# apt from the same Debian mirror into .testbed-cache/ (nothing is installed), and the build checks
# that the libraries it would open carry the 4.20 sonames.
# Usage: bash scripts/xen-headers-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /opt/swift/usr/bin/swift ] && export PATH="/opt/swift/usr/bin:$PATH"
cache=$PWD/.testbed-cache/xen-headers-trixie
mkdir -p "$cache/apt/lists/partial" "$cache/apt/archives/partial"
# The mirror this machine's apt already uses for Debian's main archive (not the security one).
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }')
[ -n "$mirror" ] || mirror=$(awk '/^deb / && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "xen-headers-check: no Debian mirror configured for apt; cannot fetch trixie's libxen-dev" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$cache/apt/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$cache/apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$cache/apt/lists"
          -o "Dir::Cache=$cache/apt" -o Dir::State::status=/dev/null -o APT::Sandbox::User=root)
if ! ls "$cache"/libxen-dev_4.20*.deb >/dev/null 2>&1; then
    timeout 300 apt-get "${apt_opts[@]}" -qq update
    (cd "$cache" && timeout 300 apt-get "${apt_opts[@]}" -qq download libxen-dev)
fi
deb=$(ls "$cache"/libxen-dev_4.20*.deb | tail -1)
rm -rf "$cache/root" && mkdir -p "$cache/root" && dpkg -x "$deb" "$cache/root"
echo "xen-headers-check: building RemusXen against $(basename "$deb")"
swift build --target RemusXen --scratch-path .build-xen420 -Xcc "-I$cache/root/usr/include" 2>&1 \
    | grep -E "error|warning: |Build" || true
object=.build-xen420/debug/CXen.build/cxen.c.o
[ -f "$object" ] || { echo "xen-headers-check: FAILED: the Xen backend does not build against Xen 4.20's headers"; exit 1; }
for lib in libxenctrl.so.4.20 libxenguest.so.4.20 libxenlight.so.4.20; do
    grep -aq "$lib" "$object" || { echo "xen-headers-check: FAILED: a 4.20 build would not open $lib"; exit 1; }
done
echo "xen-headers-check: the Xen backend builds against Xen 4.20's headers and opens the 4.20 libraries"
