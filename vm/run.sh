#!/usr/bin/env bash
# make vm-test: the filesystem tests on another kernel, in a throwaway VM.
#
# Boots KERNEL (default: the kernel that Debian's linux-image-amd64 installs,
# 6.1 on Debian 12) with virtme-ng, which shares this machine's root
# filesystem read-only with the guest, and runs pytest there as root on
# loopback Btrfs, XFS, ext4 and tmpfs made in a tmpfs inside the guest.  Then
# prints the guest's kernel release, the accelerator (KVM or TCG) and the
# test summary, and exits with pytest's status.
#
# The package is built on the host (`make setup`) and the guest imports that
# installation: the guest's userspace *is* the host's (same Python, same
# libc), its root is read-only and it has no network, so there is nothing to
# build or install inside.  The Python installation is handed to the guest as
# a squashfs image on a virtio disk mounted over the same path (built once in
# build/vm/, rebuilt when the installation changes): importing numpy and
# pytest over 9p under TCG takes minutes, from the image seconds.
#
# Environment (all optional):
#   KERNEL=/boot/vmlinuz-...  the guest kernel (its modules must be in /lib/modules)
#   FULL=1          the whole suite (tests/) instead of the `-m vm` subset; under
#                   TCG without the tests marked `slow` (100,000 files, ssh over
#                   a rate-limited link: an hour under TCG, and the link test
#                   measures throughput) unless SLOW=1
#   TESTS="..."     these paths/node ids instead (and no -m filter)
#   PYTEST_ARGS="..."  more pytest arguments, shell-quoted: PYTEST_ARGS="-x -k 'dedupe and xfs'"
#   ACCEL=auto|kvm|tcg  auto (default): try KVM with a short boot, else TCG
#   VM_JOBS=N       pytest-xdist workers in the guest (default auto: one per guest
#                   CPU; QEMU runs each vCPU on a host thread, so under TCG two
#                   halve the time); 0: no xdist
#   VM_CPUS=N VM_MEMORY=4G  guest size (default: the host's CPU count, 4G)
#   VM_TIMEOUT=S    kill the VM after S seconds (default 1800; FULL: 14400)
#   KVM_PROBE_TIMEOUT=S  how long the KVM probe boot may take (default 60)
#   PYTHON=python3  the interpreter with cloneaware and the test extras installed
#
# Results in vm/out/: pytest.log, junit.xml, console.log (everything the VM
# printed), uname, rc, accel.
set -uo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
OUT=$TOP/vm/out
VENV=${VM_VENV:-$TOP/build/vm-venv}
PYTHON=${PYTHON:-python3}
FULL=${FULL:-}
ACCEL=${ACCEL:-auto}
VM_JOBS=${VM_JOBS:-auto}
VM_CPUS=${VM_CPUS:-$(nproc)}
VM_MEMORY=${VM_MEMORY:-4G}
KVM_PROBE_TIMEOUT=${KVM_PROBE_TIMEOUT:-60}
if [ -n "$FULL" ] && [ "$FULL" != 0 ]; then FULL=1; else FULL=; fi
VM_TIMEOUT=${VM_TIMEOUT:-$([ -n "$FULL" ] && echo 14400 || echo 1800)}

say() { printf 'vm-test: %s\n' "$*"; }
die() { printf 'vm-test: FAILED: %s\n' "$1" >&2; exit "${2:-1}"; }

[ "$(id -u)" -eq 0 ] || die "needs root (loop devices and mounts inside the VM run as the host user)"

# --- the kernel ----------------------------------------------------------------
if [ -z "${KERNEL:-}" ]; then
    pkg=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null \
          | grep -o 'linux-image-[0-9][^ ,]*' | head -1)
    [ -n "$pkg" ] || die "linux-image-amd64 is not installed and KERNEL is not set"
    KERNEL=/boot/vmlinuz-${pkg#linux-image-}
fi
[ -f "$KERNEL" ] && [ -r "$KERNEL" ] \
    || die "cannot boot the VM: kernel image '$KERNEL' does not exist or is unreadable" 2
KERNEL=$(realpath "$KERNEL")

# --- the interpreter and its image --------------------------------------------------
read -r PY PY_PREFIX < <("$PYTHON" -c 'import sys; print(sys.executable, sys.prefix)') \
    || die "cannot run $PYTHON"
"$PY" -P -c 'import cloneaware.native, pytest, xdist' 2>/dev/null \
    || die "$PY cannot import cloneaware, pytest and xdist: run make setup"
# vng finds virtme-run on PATH; put its venv there only now, after python3 was resolved
export PATH="$VENV/bin:$PATH"
command -v vng >/dev/null || die "vng not found in $VENV/bin: run vm/setup.sh (make vm-test does)"
PY_IMAGE=0
IMG=$TOP/build/vm/python.sqfs
case "$PY_PREFIX" in
    /usr | /usr/local) ;;  # a system Python: leave it on the shared root
    *)
        PY_IMAGE=1
        mkdir -p "$TOP/build/vm"
        if [ ! -s "$IMG" ] || [ -n "$(find "$PY_PREFIX" -newer "$IMG" -print -quit)" ]; then
            say "making the Python image: $PY_PREFIX -> ${IMG#"$TOP"/}"
            command -v mksquashfs >/dev/null || die "mksquashfs not found: run vm/setup.sh"
            rm -f "$IMG.new"
            mksquashfs "$PY_PREFIX" "$IMG.new" -noappend -noI -noD -noF -noX \
                -quiet -no-progress >/dev/null || die "mksquashfs $PY_PREFIX failed"
            mv "$IMG.new" "$IMG"
        fi
        ;;
esac

# --- what to run -----------------------------------------------------------------------
MARK_ARGS=()
if [ -n "${TESTS:-}" ]; then
    eval "TEST_ARGS=($TESTS)" || die "cannot parse TESTS" 2
elif [ -n "$FULL" ]; then
    TEST_ARGS=(tests)
else
    # only the files that hold `vm` tests: collecting the others costs minutes under TCG
    mapfile -t TEST_ARGS < <(grep -rlE --include='test_*.py' 'mark\.vm\b' tests | sort)
    [ ${#TEST_ARGS[@]} -gt 0 ] || die "no test is marked @pytest.mark.vm under tests/"
    MARK_ARGS=(-m vm)
fi
# split like a shell command line: PYTEST_ARGS="-k 'fiemap and not ext4'" works
eval "EXTRA=(${PYTEST_ARGS:-})" || die "cannot parse PYTEST_ARGS" 2
TEST_ARGS+=("${EXTRA[@]}")

rm -rf "$OUT"
mkdir -p "$OUT"
{
    printf 'PY=%q\nPY_PREFIX=%q\nPY_IMAGE=%q\nJOBS=%q\nTMPFS_SIZE=%q\n' \
        "$PY" "$PY_PREFIX" "$PY_IMAGE" "$VM_JOBS" 85%
    q() { [ $# -gt 0 ] && printf '%q ' "$@"; }   # an empty array must stay empty
    printf 'MARK_ARGS=(%s)\n' "$(q "${MARK_ARGS[@]}")"
    printf 'TEST_ARGS=(%s)\n' "$(q "${TEST_ARGS[@]}")"
} > "$OUT/guest.env"

VNG=(vng -r "$KERNEL" --cpus "$VM_CPUS" --memory "$VM_MEMORY" --cwd "$TOP" --rwdir="$OUT")
[ "$PY_IMAGE" = 1 ] && VNG+=(--disk "$IMG")

# --- the accelerator --------------------------------------------------------------------
# /dev/kvm may exist and still not boot a standard kernel (nested paravirtual
# KVM: QEMU aborts, or the guest hangs), so boot once briefly to find out.
case "$ACCEL" in
    kvm) accel=KVM ;;
    tcg) accel=TCG ;;
    auto)
        accel=TCG
        if [ -w /dev/kvm ]; then
            say "probing KVM (a ${KVM_PROBE_TIMEOUT}s boot)"
            timeout -k 5 "$KVM_PROBE_TIMEOUT" vng -r "$KERNEL" --memory 512M -- true \
                </dev/null >"$OUT/kvm-probe.log" 2>&1
            prc=$?
            if [ $prc -eq 0 ]; then
                accel=KVM
            elif [ $prc -eq 124 ] || [ $prc -eq 137 ]; then
                say "KVM: the guest did not finish booting in ${KVM_PROBE_TIMEOUT}s; using TCG"
            else
                say "KVM: the boot failed ($(grep -v '^\[' "$OUT/kvm-probe.log" | tail -1)); using TCG"
            fi
        else
            say "no usable /dev/kvm; using TCG"
        fi
        ;;
    *) die "ACCEL must be auto, kvm or tcg, not '$ACCEL'" 2 ;;
esac
[ "$accel" = TCG ] && VNG+=(--disable-kvm)
echo "$accel" > "$OUT/accel"
# Under TCG the guest CPU is several times slower: tests scale their time
# limits (cloneaware.testing.timeout), and FULL leaves out the slow ones.
slowdown=1
if [ "$accel" = TCG ]; then
    slowdown=6
    if [ -n "$FULL" ] && [ -z "${TESTS:-}" ] && [ "${SLOW:-0}" = 0 ]; then
        say "TCG: leaving out the tests marked slow (SLOW=1 runs them)"
        printf 'MARK_ARGS=(-m %q)\n' "not slow" >> "$OUT/guest.env"
    fi
fi
printf 'ACCEL=%q\nSLOWDOWN=%q\n' "$accel" "$slowdown" >> "$OUT/guest.env"

# --- the run ------------------------------------------------------------------------------
say "booting $KERNEL under $accel (${VM_CPUS} CPUs, $VM_MEMORY); timeout ${VM_TIMEOUT}s"
start=$SECONDS
# timeout runs the VM in a process group of its own: forward an interrupt to it,
# or the VM would outlive us
timeout -k 30 "$VM_TIMEOUT" "${VNG[@]}" -- bash "$TOP/vm/guest.sh" "$OUT" \
    </dev/null > >(tee "$OUT/console.log") 2>&1 &
vm_pid=$!
trap 'kill -TERM $vm_pid 2>/dev/null; wait $vm_pid; die "interrupted; the VM was stopped" 130' INT TERM
wait $vm_pid
vrc=$?
trap - INT TERM
wait  # for tee
took=$((SECONDS - start))

echo
say "guest kernel: $(cat "$OUT/uname" 2>/dev/null || echo '? (never booted)')"
say "accelerator:  $accel"
say "time:         ${took}s (boot, tests, shutdown)"
if [ ! -f "$OUT/rc" ]; then
    if [ $vrc -eq 124 ] || [ $vrc -eq 137 ]; then
        die "the VM was killed after ${VM_TIMEOUT}s before the suite finished; see vm/out/console.log" 3
    fi
    die "the VM did not run the suite to the end (vng exit $vrc): it did not boot, or the guest died; see vm/out/console.log" 3
fi
rc=$(cat "$OUT/rc")
summary=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s.* =+$' \
          "$OUT/pytest.log" | tail -1)
say "tests:        ${summary:-? (no pytest summary line: see vm/out/pytest.log)}"
say "output:       vm/out/pytest.log, vm/out/junit.xml, vm/out/console.log"
if [ "$rc" != 0 ]; then
    die "pytest exited $rc in the VM on $(cat "$OUT/uname")" "$rc"
fi
if [ $vrc -ne 0 ]; then
    die "pytest passed but the VM exited $vrc; see vm/out/console.log" 3
fi
say "passed"
