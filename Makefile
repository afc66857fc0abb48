# cloneaware: the habits.  Filesystem tests, demo and bench need root.
PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
JOBS ?= auto


.PHONY: setup test demo bench bench-compressed bench-scale bench-incremental bench-files bench-space bench-repo bench-reuse bench-mount soak lint install clean deb deb-test vm-setup vm-test

setup:
	bash tools/setup.sh

test: setup
	$(PYTHON) -P -m pytest -n $(JOBS) tests

demo: setup
	$(PYTHON) tools/demo.py

bench: setup
	$(PYTHON) bench/bench.py

# compress-force=zstd, and Fedora's default compress=zstd:1 (a smaller family each)
bench-compressed: setup
	$(PYTHON) bench/bench.py --compressed compress-force=zstd --size 256 --clones 6 --many-clones 0
	$(PYTHON) bench/bench.py --compressed compress=zstd:1 --size 256 --clones 6 --many-clones 0

bench-scale: setup
	$(PYTHON) bench/scale.py

# Night to night beside restic, Borg and btrfs send -p (Debian's packages).
bench-incremental: setup
	command -v restic >/dev/null && command -v borg >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup >/dev/null
	$(PYTHON) bench/incremental.py

# Many files: a copy of /usr/share and /usr/include and 3 reflinked copies of it,
# beside restic, Borg, tar and btrfs send -p (issue 36).
bench-files: setup
	command -v restic >/dev/null && command -v borg >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup >/dev/null
	$(PYTHON) bench/files.py

# Sharing that df can see: reshare, a clone restored beside its family, anchors (issue 30).
bench-space: setup
	$(PYTHON) bench/space.py

# Local, encrypted and s3:// repositories (a Ceph gateway started for it).
bench-repo: setup
	$(PYTHON) bench/repos.py

bench-reuse: setup
	$(PYTHON) bench/reuse.py

# A month of nights that must lose nothing (issue 33): kills, a gateway
# outage, a damaged pack; minutes, not in make test.  SEED=N repeats a run.
soak: setup
	$(PYTHON) tools/soak.py $(if $(SEED),--seed $(SEED),)

# mount: ls -lR and a 1 GiB read through it, beside the restored tree and restore
bench-mount: setup
	$(PYTHON) bench/mount.py

lint:
	$(PYTHON) -m ruff check cloneaware tests bench tools native/build.py
	$(PYTHON) -m mypy

install:
	$(PYTHON) -m pip install --no-deps --root "$(if $(DESTDIR),$(DESTDIR),/)" --prefix "$(PREFIX)" .

clean:
	rm -rf build dist *.egg-info cloneaware/_native*.so .pytest_cache

# The Debian package (Debian 13+), built in a trixie chroot: build/deb/cloneaware_*.deb.
deb:
	bash tools/deb.sh build

# Builds it, installs it with apt in a throwaway trixie root, checks it there.
deb-test: deb
	bash tools/deb.sh test

# The filesystem tests in a throwaway VM on Debian's packaged kernel (6.1 on
# Debian 12), or KERNEL=/boot/vmlinuz-...: the `-m vm` subset, FULL=1 for the
# whole suite.  vm/run.sh lists the other knobs; results land in vm/out/.
vm-setup:
	bash vm/setup.sh

vm-test: setup vm-setup
	PYTHON=$(PYTHON) bash vm/run.sh
