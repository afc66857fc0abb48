#!/usr/bin/env bash
# What `make vm-test` needs beside the project itself (as root, idempotent):
#   apt  qemu-system-x86     the emulator
#        linux-image-amd64   Debian's packaged kernel, the default guest kernel
#        busybox-static      virtme-ng's initramfs (Debian's kernel has virtio,
#                            9p and the filesystems as modules, so it needs one)
#        squashfs-tools      the read-only image of the Python installation
#                            that the guest mounts (see vm/run.sh)
#   pip  virtme-ng           `vng`, in its own venv: build/vm-venv
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VM_VENV:-build/vm-venv}
VNG_VERSION=${VNG_VERSION:-1.42}

need=()
for pkg in qemu-system-x86 linux-image-amd64 busybox-static squashfs-tools; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "vm/setup: missing ${need[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "vm/setup: apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

if ! "$VENV/bin/vng" --version 2>/dev/null | grep -qx "virtme-ng $VNG_VERSION"; then
    echo "vm/setup: virtme-ng $VNG_VERSION into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
fi
