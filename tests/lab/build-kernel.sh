#!/usr/bin/env bash
# Build (or reuse) a lab kernel: Debian's linux-source-6.12 plus
# packaging/kernel/tierd.config plus packaging/kernel/patches/*.patch.
#
#   build-kernel.sh [tierd|debug]
#
# Flavour "tierd" (the default) is that; "debug" adds
# packaging/kernel/debug.config (DEBUG_VM, lockdep, KASAN) on top, in a build
# tree of its own, so neither flavour's objects are rebuilt for the other.
#
# The result lands in $CACHE/kernels/<flavour>-<key>/ where <key> hashes the
# source package version, the fragments, the patches and this script, so a
# second run with nothing changed is a no-op. The build tree is kept in
# $CACHE/src and patched in place (old series reverted, new one applied), so a
# changed patch recompiles only the files it touches. The series' selftest
# sources are copied next to the kernel (selftest/), so a test compiles the
# selftest of the kernel it boots, whatever series the build tree holds now.
#
# Prints the output directory on stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${TIERD_LAB_CACHE:-/var/cache/tierd-lab}
flavour=${1:-tierd}
fragments=("$repo/packaging/kernel/tierd.config")
case "$flavour" in
    tierd) ;;
    debug) fragments+=("$repo/packaging/kernel/debug.config") ;;
    *) echo "build-kernel: unknown flavour '$flavour' (tierd or debug)" >&2; exit 2 ;;
esac
patchdir=$repo/packaging/kernel/patches
tarball=/usr/src/linux-source-6.12.tar.xz
jobs=${TIERD_LAB_JOBS:-$(nproc)}

log() { echo "build-kernel: $*" >&2; }

# One build per tree at a time: concurrent test sessions wait here for the first
# one (the debug flavour's tree has a lock of its own).
mkdir -p "$cache"
lock=$cache/build.lock
[ "$flavour" = tierd ] || lock=$cache/build-$flavour.lock
exec 9>"$lock"
flock 9

[ -f "$tarball" ] || { log "missing $tarball (apt-get install linux-source-6.12)"; exit 1; }
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12)

shopt -s nullglob
patches=()
for p in "$patchdir"/*.patch; do
    # git format-patch's cover letter describes the series and has no diff.
    [ "$(basename "$p")" = 0000-cover-letter.patch ] || patches+=("$p")
done
shopt -u nullglob

key=$( { echo "$srcver"; cat "${fragments[@]}" "$0"; for p in "${patches[@]}"; do basename "$p"; cat "$p"; done; } \
       | sha256sum | cut -c1-16)
out=$cache/kernels/$flavour-$key
if [ -f "$out/bzImage" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

tree=$cache/src/linux-$srcver
[ "$flavour" = tierd ] || tree=$tree-$flavour
if [ ! -f "$tree/Makefile" ]; then
    log "unpacking $tarball ($srcver)"
    rm -rf "$tree" && mkdir -p "$tree"
    tar -xf "$tarball" -C "$tree" --strip-components=1
fi

# Revert the series applied by the previous build, newest first, then apply
# the current one. Reverting and re-applying refreshes the mtime of every file
# either series touches; a file whose content comes back unchanged gets its old
# mtime back, so make rebuilds only what really changed (a syscall patch
# touches headers that half the kernel includes).
applied=$tree/.tierd-applied
shopt -s nullglob
touched=$(sed -n 's|^+++ b/\([^\t]*\).*|\1|p' "$applied"/*.patch "${patches[@]}" | sort -u)
shopt -u nullglob
before=$(mktemp)
trap 'rm -f "$before"' EXIT
for f in $touched; do
    [ -f "$tree/$f" ] && echo "$f $(stat -c %Y "$tree/$f") $(sha256sum < "$tree/$f" | cut -d' ' -f1)"
done > "$before"
if [ -d "$applied" ]; then
    for p in $(ls -r "$applied"); do
        log "reverting $p"
        patch -d "$tree" -p1 -R --batch --quiet < "$applied/$p"
    done
    rm -rf "$applied"
fi
mkdir -p "$applied"
for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$tree" -p1 --forward --batch --quiet < "$p"
    cp "$p" "$applied/"
done
while read -r f mtime sum; do
    [ -f "$tree/$f" ] && [ "$(sha256sum < "$tree/$f" | cut -d' ' -f1)" = "$sum" ] \
        && touch -m -d "@$mtime" "$tree/$f"
done < "$before"

log "configuring"
make -C "$tree" -s x86_64_defconfig >&2
make -C "$tree" -s kvm_guest.config >&2
(cd "$tree" && scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null)
make -C "$tree" -s olddefconfig >&2

# merge_config warns but does not fail when a dependency drops an option.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$tree/.config" || { log "not taken: $line"; missing=1; } ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            ! grep -q "^$sym=" "$tree/.config" || { log "not unset: $sym"; missing=1; } ;;
    esac
done < <(cat "${fragments[@]}")
[ "$missing" = 0 ] || { log "config fragment did not apply cleanly"; exit 1; }

log "building bzImage with $jobs jobs (about 15 minutes on 2 cores from scratch)"
start=$(date +%s)
make -C "$tree" -j"$jobs" -s bzImage >&2
log "built in $(( $(date +%s) - start )) s"

tmp=$out.tmp.$$
rm -rf "$tmp" && mkdir -p "$tmp"
cp "$tree/arch/x86/boot/bzImage" "$tree/.config" "$tmp/"
make -C "$tree" -s kernelrelease > "$tmp/kernelrelease"
# The selftest and the headers it includes, as this series has them.
selftests=tools/testing/selftests
for f in $selftests/mm/move_phys_pages.c $selftests/mm/vm_util.h \
         $selftests/kselftest_harness.h $selftests/kselftest.h; do
    mkdir -p "$tmp/selftest/$(dirname "$f")"
    cp "$tree/$f" "$tmp/selftest/$f"
done
echo "$srcver" > "$tmp/source-version"
rm -rf "$out" && mv "$tmp" "$out"
echo "$out"
