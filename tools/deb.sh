#!/usr/bin/env bash
# make deb / make deb-test: the Debian package, built in a clean Debian 13
# (trixie) root and tested installed in a throwaway one.
#
#   tools/deb.sh build   dpkg-buildpackage in build/deb/build-root (a trixie
#                        chroot with the build dependencies), then lintian;
#                        leaves build/deb/cloneaware_VERSION_ARCH.deb and
#                        build/deb/lintian.txt
#   tools/deb.sh test    a fresh trixie root from the cached debootstrap,
#                        `apt-get install ./cloneaware_*.deb` in it (the
#                        dependencies come from the mirror), then
#                        tools/deb_test_inside.sh in it: --help, --version,
#                        man, completions, a round trip on a loopback XFS,
#                        the nightly job (run, its units verified, man page 5)
#
# The package is built for Debian 13 or later (python3-typer >= 0.9; Debian 12
# has 0.7), so it is built in a trixie root whatever this machine runs.
# Needs root (debootstrap, chroot, mount, loop devices); installs debootstrap
# with apt when missing.  Caches under build/ (make clean removes them):
#   build/debootstrap-trixie.tar  the debootstrap --variant=minbase root, made once
#   build/deb/build-root/         the build chroot, kept with its build dependencies
#
# Environment:
#   DEB_MIRROR   Debian mirror (default: the one apt on this machine uses)
#   DEB_SUITE    trixie (default) or a later suite
#   DEB_CHROOT   no: build on this machine with plain dpkg-buildpackage instead
#                (it must be Debian 13 or later with the build dependencies)
#   DEB_KEEP     1: keep the test root (build/deb/test-root) for a look inside
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
SUITE=${DEB_SUITE:-trixie}
OUT=$TOP/build/deb
BASE_TAR=$TOP/build/debootstrap-$SUITE.tar
BROOT=$OUT/build-root
TROOT=$OUT/test-root
VERSION=$(dpkg-parsechangelog -l "$TOP/debian/changelog" -S Version 2>/dev/null \
          || sed -n '1s/.*(\(.*\)).*/\1/p' "$TOP/debian/changelog")
UPSTREAM=${VERSION%-*}
CHROOT_PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { printf '%s: [%3ss] %s\n' "deb" "$SECONDS" "$*"; }
die() { printf '%s: FAILED: %s\n' "deb" "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount); run it as root"

pyver=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' cloneaware/_version.py)
[ "$pyver" = "$UPSTREAM" ] || die "debian/changelog says $VERSION but cloneaware/_version.py says $pyver"

# --- mounts: never remove a directory with anything mounted below it ------------
mounts_under() {  # DIR -> mount points at or below DIR, deepest first
    local d
    d=$(realpath -m "$1")
    awk -v d="$d" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}
umount_under() {
    local m
    for m in $(mounts_under "$1"); do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done
}
safe_rm() {
    umount_under "$1"
    [ -z "$(mounts_under "$1")" ] || die "still mounted below $1: $(mounts_under "$1" | tr '\n' ' ')"
    rm -rf --one-file-system "$1"
}
mount_pseudo() {  # ROOT: fresh proc, sysfs and devpts instances (not the host's /dev)
    mount -t proc proc "$1/proc"
    mount -t sysfs -o ro sysfs "$1/sys"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$1/dev/pts"
}

# --- apt: the same mirror (and proxy) as this machine -----------------------------------
mirror() {
    if [ -n "${DEB_MIRROR:-}" ]; then echo "$DEB_MIRROR"; return; fi
    local m
    m=$(apt-get indextargets --format '$(LABEL) $(REPO_URI)' 2>/dev/null \
        | awk '$1 == "Debian" { print $2; exit }')
    echo "${m:-http://deb.debian.org/debian/}"
}
proxy=$(apt-config shell p Acquire::http::Proxy 2>/dev/null | sed -n "s/^p='\(.*\)'$/\1/p" || true)
if [ -n "$proxy" ] && [ "$proxy" != DIRECT ]; then export http_proxy=$proxy; fi

in_root() {  # ROOT CMD...: a clean environment inside ROOT
    local root=$1; shift
    chroot "$root" /usr/bin/env -i PATH=$CHROOT_PATH HOME=/root LC_ALL=C.UTF-8 TERM=dumb \
        DEBIAN_FRONTEND=noninteractive ${http_proxy:+http_proxy=$http_proxy} "$@"
}

ensure_base() {
    [ -s "$BASE_TAR" ] && return
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap"
        apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
    fi
    local tmp=$OUT/debootstrap.tmp m
    m=$(mirror)
    safe_rm "$tmp"
    mkdir -p "$OUT"
    say "debootstrap --variant=minbase $SUITE from $m (once; cached as $BASE_TAR)"
    debootstrap --variant=minbase "$SUITE" "$tmp" "$m" > "$OUT/debootstrap.log" 2>&1 \
        || { tail -n 30 "$OUT/debootstrap.log" >&2; die "debootstrap $SUITE failed (log: $OUT/debootstrap.log)"; }
    # nothing in a throwaway root starts services
    printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    tar --numeric-owner -C "$tmp" -cpf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    safe_rm "$tmp"
}

unpack_base() {  # DIR
    safe_rm "$1"
    mkdir -p "$1"
    tar --numeric-owner -C "$1" -xpf "$BASE_TAR"
    # a throwaway root: no fsync after every file dpkg unpacks (as sbuild does)
    echo force-unsafe-io > "$1/etc/dpkg/dpkg.cfg.d/unsafe-io"
}

copy_source() {  # DEST: the work tree's files (tracked and untracked, not ignored)
    mkdir -p "$1"
    if git -C "$TOP" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$TOP" ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
            | tar --null -T - -cf - | tar -C "$1" -xf -
    else
        tar --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude='*.so' \
            --exclude=__pycache__ --exclude=./.git -cf - . | tar -C "$1" -xf -
    fi
}

collect() {  # DIR with the build's output -> $OUT
    rm -f "$OUT"/cloneaware_*.deb "$OUT"/cloneaware_*.changes "$OUT"/cloneaware_*.buildinfo
    cp "$1"/cloneaware_"$UPSTREAM"*.deb "$1"/cloneaware_"$UPSTREAM"*.buildinfo \
       "$1"/cloneaware_"$UPSTREAM"*.changes "$OUT"/
}

build_in_chroot() {
    ensure_base
    local stamp want
    want=$(cat "$BASE_TAR" "$TOP/debian/control" | cksum | cut -d' ' -f1)
    stamp=$(cat "$BROOT/.cloneaware-build-root" 2>/dev/null || true)
    if [ "$stamp" != "$want" ]; then
        say "making the build root $BROOT"
        unpack_base "$BROOT"
    fi
    umount_under "$BROOT"
    trap 'umount_under "$BROOT"' EXIT
    mount_pseudo "$BROOT"
    rm -rf --one-file-system "$BROOT/build"
    copy_source "$BROOT/build/cloneaware-$UPSTREAM"
    if [ "$stamp" != "$want" ] \
       || ! in_root "$BROOT" sh -c "cd /build/cloneaware-$UPSTREAM && dpkg-checkbuilddeps" 2>/dev/null; then
        say "installing the build dependencies and lintian in the build root"
        in_root "$BROOT" apt-get update -qq
        in_root "$BROOT" apt-get install -y -qq --no-install-recommends build-essential lintian >/dev/null
        in_root "$BROOT" apt-get build-dep -y -qq --no-install-recommends \
            "/build/cloneaware-$UPSTREAM" >/dev/null
        echo "$want" > "$BROOT/.cloneaware-build-root"
    fi
    # built by an unprivileged user: the package says Rules-Requires-Root: no
    chown -R 65534:65534 "$BROOT/build"
    say "dpkg-buildpackage -b in $SUITE (log: $OUT/build.log)"
    chroot --userspec=65534:65534 "$BROOT" /usr/bin/env -i PATH=$CHROOT_PATH HOME=/tmp \
        LC_ALL=C.UTF-8 sh -c "cd /build/cloneaware-$UPSTREAM && dpkg-buildpackage -us -uc -b" \
        > "$OUT/build.log" 2>&1 \
        || { tail -n 40 "$OUT/build.log" >&2; die "dpkg-buildpackage failed (log: $OUT/build.log)"; }
    collect "$BROOT/build"
    say "lintian (in $SUITE)"
    local rc=0
    chroot --userspec=65534:65534 "$BROOT" /usr/bin/env -i PATH=$CHROOT_PATH HOME=/tmp \
        LC_ALL=C.UTF-8 sh -c "lintian --display-info --display-experimental --fail-on error /build/cloneaware_${VERSION}_*.changes" \
        > "$OUT/lintian.txt" 2>&1 || rc=$?
    sed 's/^/lintian: /' "$OUT/lintian.txt"
    [ "$rc" -eq 0 ] || die "lintian reports errors (exit $rc; $OUT/lintian.txt)"
    umount_under "$BROOT"
    trap - EXIT
}

build_on_host() {
    local src=$OUT/host-src
    rm -rf "$src"
    copy_source "$src/cloneaware-$UPSTREAM"
    say "dpkg-buildpackage -b on this machine (log: $OUT/build.log)"
    (cd "$src/cloneaware-$UPSTREAM" && dpkg-buildpackage -us -uc -b) > "$OUT/build.log" 2>&1 \
        || { tail -n 40 "$OUT/build.log" >&2; die "dpkg-buildpackage failed (log: $OUT/build.log)"; }
    collect "$src"
    if command -v lintian >/dev/null; then
        lintian --display-info --fail-on error "$OUT"/cloneaware_"${VERSION}"_*.changes | tee "$OUT/lintian.txt"
    fi
}

do_build() {
    mkdir -p "$OUT"
    if [ "${DEB_CHROOT:-yes}" = no ]; then build_on_host; else build_in_chroot; fi
    say "built: $(cd "$OUT" && ls cloneaware_*.deb)"
    dpkg-deb --info "$OUT"/cloneaware_*.deb | sed -n 's/^ \(Version\|Architecture\|Depends\|Recommends\):/deb:   \1:/p'
}

cleanup_test() {
    local rc=$?
    umount_under "$TROOT"
    if [ "${DEB_KEEP:-0}" != 1 ] && [ -z "$(mounts_under "$TROOT")" ]; then
        rm -rf --one-file-system "$TROOT"
    fi
    if [ "$rc" -ne 0 ]; then
        printf 'deb-test: FAILED (exit %s); see the output above\n' "$rc" >&2
    fi
}

do_test() {
    local debs
    debs=$(cd "$OUT" 2>/dev/null && ls cloneaware_"${VERSION}"_*.deb 2>/dev/null || true)
    [ -n "$debs" ] || die "no $OUT/cloneaware_${VERSION}_*.deb: run make deb first"
    [ "$(wc -w <<<"$debs")" -eq 1 ] || die "more than one .deb in $OUT: $debs"
    grep -qw xfs /proc/filesystems || modprobe xfs 2>/dev/null || true
    grep -qw xfs /proc/filesystems || die "this kernel has no XFS, needed for the loopback round trip"
    ensure_base
    trap cleanup_test EXIT
    say "fresh $SUITE root in $TROOT"
    unpack_base "$TROOT"
    mount_pseudo "$TROOT"
    cp "$OUT/$debs" "$TROOT/tmp/"
    chmod 0644 "$TROOT/tmp/$debs"
    say "apt-get install ./$debs (and man-db, bash-completion, zsh, fish, xfsprogs, systemd to test with)"
    in_root "$TROOT" apt-get update -qq
    in_root "$TROOT" sh -c "cd /tmp && apt-get install -y -q ./$debs man-db bash-completion zsh fish xfsprogs systemd" \
        > "$OUT/test-install.log" 2>&1 \
        || { tail -n 30 "$OUT/test-install.log" >&2; die "apt-get install ./$debs failed (log: $OUT/test-install.log)"; }
    grep -E '^(Setting up|Unpacking) cloneaware ' "$OUT/test-install.log" | sed 's/^/deb: /'
    say "loopback XFS (made with the root's mkfs.xfs, mounted from outside) at /mnt/xfs"
    truncate -s 512M "$TROOT/var/tmp/xfs.img"
    in_root "$TROOT" mkfs.xfs -q -m reflink=1 /var/tmp/xfs.img
    mkdir -p "$TROOT/mnt/xfs"
    mount -o loop "$TROOT/var/tmp/xfs.img" "$TROOT/mnt/xfs"
    cp tools/deb_test_inside.sh "$TROOT/var/tmp/"
    in_root "$TROOT" bash /var/tmp/deb_test_inside.sh /mnt/xfs
}

case ${1:-} in
    build) do_build ;;
    test) do_test ;;
    *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
