#!/usr/bin/env bash
# Installs what remusd needs to build on Debian 12 (only what is missing), then builds it.
# Usage: bash scripts/setup.sh [debug|release] [tests]   (default: release; "tests" adds what
# the test suite uses besides: nftables for the black-holed connect, stress-ng for the run under load,
# qemu-utils for qemu-io, an NBD client independent of ours)
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-release}"

packages=(libnl-3-dev libnl-route-3-dev libssl-dev pkg-config etcd-server libxen-dev)
[ "${2:-}" = tests ] && packages+=(nftables stress-ng qemu-utils)
need=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v swift >/dev/null; then
    [ -x /opt/swift/usr/bin/swift ] && export PATH="/opt/swift/usr/bin:$PATH"
fi
command -v swift >/dev/null || { echo "setup: no Swift toolchain found (looked on PATH and in /opt/swift); install Swift 6.1 or later" >&2; exit 1; }
echo "setup: building remusd ($config)"
swift build -c "$config" --product remusd 2>&1 | grep -Ev "^\[|^Building|^Compiling|^Write|^Emitting" || true
test -x ".build/$config/remusd" || { echo "setup: the build failed; run 'swift build -c $config' to see why" >&2; exit 1; }
