#!/usr/bin/env bash
# The replica page-read/discard race (Tests/RemusSimTests/ReplicaRace.swift, which ReplicaRaceTests
# also runs) under ThreadSanitizer.
#
# `swift test --sanitize=thread` cannot build this package with Swift 6.3.1: swift-frontend
# aborts on RemusCore ("Invalid bitcast", in DirtyBitmap.swift and StreamEncoder+PageBatch.swift:
# a ~Copyable struct with two stored properties whose mutating method branches). So RemusCore is
# linked from the ordinary debug build, uninstrumented (with RemusSystem and its C shims CMalloc
# and CPipe, RemusDisk and its C shim CDisk, and swift-system, which RemusSim uses), and RemusSim plus this harness are built
# with -sanitize=thread. Takes a few seconds after `swift build --build-tests`.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
debug=$root/.build/x86_64-unknown-linux-gnu/debug
[ -f "$debug/Modules/RemusCore.swiftmodule" ] || { echo "run 'swift build --build-tests' first" >&2; exit 2; }
out=$(mktemp -d /tmp/remusd-tsan-XXXXXX)
trap 'rm -rf "$out"' EXIT
system=$root/.build/checkouts/swift-system/Sources/CSystem/include
flags=(-sanitize=thread -swift-version 6 -g -Onone -I "$debug/Modules"
       -Xcc "-fmodule-map-file=$debug/CCRC32C.build/module.modulemap" -Xcc "-I$root/Sources/CCRC32C/include"
       -Xcc "-fmodule-map-file=$debug/CDisk.build/module.modulemap" -Xcc "-I$root/Sources/CDisk/include"
       -Xcc "-fmodule-map-file=$debug/CMalloc.build/module.modulemap" -Xcc "-I$root/Sources/CMalloc/include"
       -Xcc "-fmodule-map-file=$debug/CPipe.build/module.modulemap" -Xcc "-I$root/Sources/CPipe/include"
       -Xcc "-fmodule-map-file=$system/module.modulemap" -Xcc "-I$system")
(cd "$out" && swiftc "${flags[@]}" -enable-testing -parse-as-library -module-name RemusSim \
    -emit-module -emit-module-path "$out/RemusSim.swiftmodule" -c "$root"/Sources/RemusSim/*.swift)
swiftc "${flags[@]}" -I "$out" scripts/tsan/main.swift Tests/RemusSimTests/ReplicaRace.swift "$out"/*.o "$debug"/RemusCore.build/*.o \
    "$debug/CCRC32C.build/crc32c.c.o" "$debug"/RemusDisk.build/*.o "$debug/CDisk.build/cdisk.c.o" "$debug"/RemusSystem.build/*.o "$debug/CMalloc.build/cmalloc.c.o" "$debug/CPipe.build/cpipe.c.o" "$debug"/SystemPackage.build/*.o \
    $(find "$debug/CSystem.build" -name '*.o') -o "$out/replica-race"
# TSan exits 66 on a report; the harness exits 1 on a wrong read.
"$out/replica-race"
