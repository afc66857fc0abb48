#!/bin/bash
# Runs inside the throwaway VM (started by vm/run.sh), as root, in the
# checkout.  The host's root filesystem is mounted read-only; OUT (vm/out) is
# shared read-write.  Settings come from $OUT/guest.env, written by the host
# (the guest does not inherit the host's environment).
#
# Writes into OUT: uname (the guest's `uname -r`), pytest.log, junit.xml and,
# last, rc (pytest's exit status).  No rc file means the suite never finished.
set -u
OUT=${1:?usage: guest.sh OUT}
# shellcheck source=/dev/null
. "$OUT/guest.env"     # PY PY_PREFIX PY_IMAGE MARK_ARGS TEST_ARGS JOBS TMPFS_SIZE ACCEL SLOWDOWN

say() { echo "vm-guest: $*"; }
uname -r > "$OUT/uname"
say "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo)"

for m in loop btrfs xfs ext4 squashfs; do
    modprobe "$m" 2>/dev/null || say "modprobe $m failed (built in, or missing)"
done

# The Python installation as a read-only squashfs on a virtio disk, over the
# same path: python's thousands of small files are far slower over 9p.
if [ "${PY_IMAGE:-}" = 1 ]; then
    dev=
    for b in /sys/block/vd* /sys/block/sd*; do
        [ -e "$b" ] || continue
        d=/dev/${b##*/}
        if [ "$(dd if="$d" bs=4 count=1 2>/dev/null)" = hsqs ]; then dev=$d; break; fi
    done
    if [ -z "$dev" ] || ! mount -t squashfs -o ro "$dev" "$PY_PREFIX"; then
        say "cannot mount the Python image over $PY_PREFIX; using it over 9p"
    fi
fi

# A fresh tmpfs for everything the suite writes: the loopback images, pytest's
# temporary directories.  Not over /tmp: the checkout (and OUT) may live
# there, as a fresh clone in /tmp does, and would be hidden.
SCRATCH=/run/cloneaware-vm
mkdir -p "$SCRATCH" && mount -t tmpfs -o "size=$TMPFS_SIZE,mode=1777" tmpfs "$SCRATCH" \
    || { say "cannot mount a tmpfs on $SCRATCH"; exit 90; }
export TMPDIR=$SCRATCH HOME=$SCRATCH/home PYTHONDONTWRITEBYTECODE=1 \
       HYPOTHESIS_STORAGE_DIRECTORY=$SCRATCH/hypothesis \
       CLONEAWARE_TEST_SLOWDOWN="${SLOWDOWN:-1}"
mkdir -p "$HOME"
export PATH="$(dirname "$PY"):$PATH"

# virtme-ng gives the guest an /etc/shadow with root locked ('!'): sshd then
# refuses root even by key, and the ssh tests (tests/fs/test_remote.py) log in
# as root.  Unlock it without a password ('*'), in place (the file is a mount).
if grep -q '^root:!' /etc/shadow 2>/dev/null; then
    shadow=$(sed 's/^root:![^:]*:/root:*:/' /etc/shadow) && printf '%s\n' "$shadow" > /etc/shadow
fi

xdist=()
[ "$JOBS" != 0 ] && xdist=(-n "$JOBS")
say "pytest ${MARK_ARGS[*]} ${TEST_ARGS[*]} ${xdist[*]}"
"$PY" -P -m pytest -p no:cacheprovider --basetemp="$SCRATCH/pytest" \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit1 -o junit_suite_name="vm-$(uname -r)" \
    -rfEsx --durations=15 "${xdist[@]}" "${MARK_ARGS[@]}" "${TEST_ARGS[@]}" \
    2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
echo "$rc" > "$OUT/rc"
sync
exit "$rc"
