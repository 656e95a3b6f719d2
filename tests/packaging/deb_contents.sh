#!/bin/bash
# Builds the .deb with cpack from the build tree and inspects it: files, control fields,
# conffiles and maintainer scripts; then checks the shipped config with the shipped binary
# and verifies the shipped unit pointed at the shipped binary.
# Usage: deb_contents.sh BUILD_DIR
set -u
BUILD=$1
WORK=$(mktemp -d /tmp/epd-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
(cd "$WORK" && cpack -G DEB --config "$BUILD/CPackConfig.cmake" -B "$WORK/out" >"$WORK/cpack.log" 2>&1) ||
    { cat "$WORK/cpack.log"; fail "cpack failed"; }
DEB=$(ls "$WORK"/out/epd_*.deb 2>/dev/null | head -1)
[ -n "$DEB" ] || { cat "$WORK/cpack.log"; fail "no epd_*.deb produced"; }
dpkg-deb -c "$DEB" >"$WORK/contents" || fail "dpkg-deb -c"
for f in ./usr/bin/epd ./usr/bin/epctl ./usr/lib/systemd/system/epd.service \
    ./etc/epd/epd.json ./usr/lib/sysusers.d/epd.conf ./usr/share/doc/epd/README.md \
    ./usr/share/doc/epd/README.epctl.md; do
    grep -q " $f\$" "$WORK/contents" || { cat "$WORK/contents"; fail "$f missing from the package"; }
done
grep -E ' \./usr/bin/epd$' "$WORK/contents" | grep -q '^-rwxr-xr-x' || fail "epd is not executable"
dpkg-deb -I "$DEB" >"$WORK/info" || fail "dpkg-deb -I"
grep -q '^ Package: epd$' "$WORK/info" || fail "package name"
dep=$(grep '^ Depends:' "$WORK/info")
for p in libuv1 libcjson1 libhttp-parser2.9 libsystemd0 libssl3; do
    echo "$dep" | grep -q "$p" || fail "Depends lacks $p: $dep"
done
for s in postinst prerm postrm conffiles; do
    grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\*? *$s" "$WORK/info" || { cat "$WORK/info"; fail "control member $s missing"; }
done
dpkg-deb -e "$DEB" "$WORK/control" || fail "dpkg-deb -e"
grep -qx /etc/epd/epd.json "$WORK/control/conffiles" || fail "epd.json is not a conffile"
grep -q 'systemd-sysusers\|useradd' "$WORK/control/postinst" || fail "postinst creates no user"
sh -n "$WORK/control/postinst" && sh -n "$WORK/control/prerm" && sh -n "$WORK/control/postrm" ||
    fail "maintainer script syntax"
dpkg-deb -x "$DEB" "$WORK/root" || fail "dpkg-deb -x"
"$WORK/root/usr/bin/epctl" config check "$WORK/root/etc/epd/epd.json" || fail "shipped config invalid"
"$WORK/root/usr/bin/epd" --check -c "$WORK/root/etc/epd/epd.json" || fail "epd rejects shipped config"
"$(dirname "$0")/unit_verify.sh" "$WORK/root/usr/lib/systemd/system/epd.service" \
    "$WORK/root/usr/bin/epd" || fail "shipped unit does not verify"
echo "package $(basename "$DEB") checked"
