#!/usr/bin/env bash
# Put include/qemu/qemu-plugin.h of the installed qemu-system-x86's source
# package in $CACHE/qemu-plugin/<version>/qemu/ and point
# $CACHE/qemu-plugin/current at it; print that include directory.
#
# The plugin API must match the QEMU that loads the plugin, so the header
# comes from the very source version of the installed binary: a deb-src
# entry for the archive and suite apt installed it from, in a private apt
# state (the host's sources and package lists are left alone), and only the
# header is extracted from the orig tarball. Cached: with the header present
# for the installed version it does nothing.
set -euo pipefail
cache=${TIERD_LAB_CACHE:-/var/cache/tierd-lab}/qemu-plugin
version=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
dir=$cache/${version//:/_}
if [ ! -f "$dir/qemu/qemu-plugin.h" ]; then
    # "*** <version>" is followed by the archives that carry it: "500 URI suite/component arch Packages".
    origin=$(apt-cache policy qemu-system-x86 | awk '
        /^ \*\*\* / { found = 1; next }
        found && $2 ~ /^https?:/ { print $2, $3; exit }')
    if [ -z "$origin" ]; then
        echo "fetch-qemu-plugin-header: no archive carries the installed qemu-system-x86 $version" >&2
        exit 1
    fi
    read -r uri suite_component <<<"$origin"
    suite=${suite_component%%/*}
    component=${suite_component#*/}
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/src"
    echo "deb-src $uri $suite $component" > "$work/sources.list"
    apt_private=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=-
                 -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
                 -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
    echo "fetch-qemu-plugin-header: qemu $version from $uri $suite" >&2
    apt-get "${apt_private[@]}" update -q >&2
    (cd "$work/src" && apt-get "${apt_private[@]}" source --download-only -q "qemu=$version" >&2)
    orig=$(ls "$work"/src/qemu_*.orig.tar.*)
    tar -xf "$orig" -C "$work/src" --wildcards --no-anchored 'include/qemu/qemu-plugin.h'
    mkdir -p "$dir/qemu"
    cp "$(find "$work/src" -path '*/include/qemu/qemu-plugin.h' | head -n1)" "$dir/qemu/qemu-plugin.h.tmp"
    mv "$dir/qemu/qemu-plugin.h.tmp" "$dir/qemu/qemu-plugin.h"
fi
ln -sfn "$dir" "$cache/current"
echo "$cache/current"
