#!/usr/bin/env bash
# Install what cloneaware needs on a fresh Debian machine (as root), then the
# package itself (not editable) with its test dependencies.  Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
need=()
for cmd in mkfs.btrfs:btrfs-progs mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs filefrag:e2fsprogs \
           xfs_io:xfsprogs setfacl:acl setfattr:attr rsync:rsync losetup:mount \
           /usr/sbin/sshd:openssh-server ssh:openssh-client ip:iproute2 nsenter:util-linux \
           compsize:btrfs-compsize \
           ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common \
           monmaptool:ceph-common ceph-authtool:ceph-common radosgw-admin:radosgw \
           duperemove:duperemove fusermount3:fuse3 pkg-config:pkg-config \
           /usr/include/fuse3/fuse_lowlevel.h:libfuse3-dev; do
    c=${cmd%%:*}
    command -v "$c" >/dev/null 2>&1 || [ -e "$c" ] || need+=("${cmd##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing ${need[*]}; run as root or install them" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
stamp=$($PYTHON - <<'PY'
import hashlib, pathlib
h = hashlib.sha256()
for p in sorted(pathlib.Path(".").glob("native/*")) + sorted(pathlib.Path("cloneaware").rglob("*.py")) + [pathlib.Path("pyproject.toml")]:
    h.update(p.read_bytes())
print(h.hexdigest()[:16])
PY
)
if [ "$(cat build/.installed 2>/dev/null)" != "$stamp" ] || ! $PYTHON -P -c 'import cloneaware.native' 2>/dev/null; then
    $PYTHON -m pip install -q --disable-pip-version-check ".[test,s3,mount]"
    mkdir -p build && echo "$stamp" > build/.installed
fi
