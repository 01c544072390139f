#!/usr/bin/env bash
# fetch-xen-utils.sh - fetch Debian's xen-utils-4.17 and unpack it (not install it).
#
# Usage: tools/fetch-xen-utils.sh [DEST]     (default DEST: <repo>/.cache/xen-utils)
#
# The tests need two things from that package: the stock libxl-save-helper
# (driven with tests/fakexen preloaded) and Xen's verify-stream-v2.  Nothing
# is installed: the .deb is unpacked with dpkg-deb -x into DEST/root.  If the
# helper is already there, nothing is done.  On success the root path is
# printed on stdout; on failure one line goes to stderr and the exit status
# is non-zero.

set -euo pipefail

PKG=xen-utils-4.17
HELPER_REL=usr/lib/xen-4.17/bin/libxl-save-helper

die() {
    echo "fetch-xen-utils: $*" >&2
    exit 1
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-"$repo_root/.cache/xen-utils"}
root="$dest/root"

if [ -x "$root/$HELPER_REL" ]; then
    echo "$root"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: cannot download $PKG (set XCSAVE_XEN_UTILS to an unpacked copy)"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found: cannot unpack $PKG"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# apt-get download writes into the current directory.  Its output goes to
# a log so that stdout carries only the root path.
download() {
    (cd "$tmp" && apt-get download "$PKG") >"$tmp/apt.log" 2>&1
}

if ! download; then
    # A fresh machine (or container) often has no package lists yet.
    apt-get update >"$tmp/update.log" 2>&1 ||
        die "apt-get update failed: $(tail -n 1 "$tmp/update.log")"
    download || die "apt-get download $PKG failed: $(tail -n 1 "$tmp/apt.log")"
fi

debs=("$tmp"/"$PKG"_*.deb)
[ -f "${debs[0]}" ] || die "apt-get download $PKG produced no .deb"

# Unpack beside the destination, then rename: a half-unpacked tree must
# never look like a complete one to the next run.
mkdir -p "$dest"
# A cache is never source: keep it out of git without touching .gitignore.
[ -e "$dest/.gitignore" ] || echo '*' >"$dest/.gitignore"
staging=$(mktemp -d "$dest/.root.XXXXXX")
dpkg-deb -x "${debs[0]}" "$staging" 2>"$tmp/dpkg.log" || {
    rm -rf "$staging"
    die "dpkg-deb -x failed: $(tail -n 1 "$tmp/dpkg.log")"
}
[ -x "$staging/$HELPER_REL" ] || {
    rm -rf "$staging"
    die "$PKG has no $HELPER_REL"
}
rm -rf "$root"
mv "$staging" "$root"

echo "$root"
