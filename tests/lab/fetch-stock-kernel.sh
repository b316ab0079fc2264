#!/usr/bin/env bash
# Fetch (or reuse) Debian's stock 6.12 kernel for the lab, matching the
# version of the installed linux-source-6.12, without installing it on the
# host: the .deb is unpacked into $CACHE/kernels/stock-<version>/.
#
# Prints the output directory on stdout; progress goes to stderr.
set -euo pipefail

cache=${TIERD_LAB_CACHE:-/var/cache/tierd-lab}
log() { echo "fetch-stock-kernel: $*" >&2; }

srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12)
abi="${srcver%%-*}+deb12-amd64"
pkg="linux-image-${abi}-unsigned"
out=$cache/kernels/stock-$abi
if [ -f "$out/vmlinuz" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "downloading $pkg"
(cd "$work" && apt-get download -q "$pkg" >&2)
dpkg-deb -x "$work"/*.deb "$work/root"

tmp=$out.tmp.$$
rm -rf "$tmp" && mkdir -p "$tmp"
cp "$work/root/boot/vmlinuz-$abi" "$tmp/vmlinuz"
cp "$work/root/boot/config-$abi" "$tmp/config"
mkdir -p "$tmp/lib"
mv "$work/root/lib/modules" "$tmp/lib/modules"
depmod -b "$tmp" "$abi"
echo "$abi" > "$tmp/kernelrelease"
rm -rf "$out" && mv "$tmp" "$out"
echo "$out"
