#!/usr/bin/env bash
# Install the Debian packages listed in debian-packages.txt that are missing.
# Then fetch the TCG plugin API header of the installed QEMU (for
# benchmarks/judge) from Debian's qemu source package, once per QEMU version.
# Idempotent: with everything in place it does nothing (no apt-get update).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t wanted < <(sed -e 's/#.*//' -e '/^\s*$/d' "$here/debian-packages.txt")
missing=()
for pkg in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
"$here/fetch-qemu-plugin-header.sh"
