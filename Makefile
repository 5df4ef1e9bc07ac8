# Two commands a user needs: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 3000
DEBIAN_PACKAGES := qemu-system-x86 qemu-utils musl-tools gcc make cpio e2fsprogs dosfstools mtools kmod python3-venv python3-pip chromium chromium-driver golang-go g++ binutils cargo nodejs openjdk-17-jdk-headless bubblewrap bc bison flex libelf-dev libssl-dev xz-utils fdisk syslinux syslinux-common systemd-boot-efi ovmf pkg-config python3-dev
# Without their Recommends (lvm2, swtpm, other hypervisors' drivers): only the qemu driver is used.
LIBVIRT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
PYTEST_ARGS ?=

.PHONY: setup packages libvirt-user venv kernel kernel-micro kernel-disk run test lint bench clean

# kernel-micro is the provider's default kernel; the cloud kernel stays for `kernel: cloud`;
# kernel-disk is what exported bootable disks boot.
setup: packages libvirt-user venv kernel kernel-micro kernel-disk

# Idempotent: apt runs only when a package is missing.
packages:
	@missing() { for p in "$$@"; do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done; }; \
	base=$$(missing $(DEBIAN_PACKAGES)); libvirt=$$(missing $(LIBVIRT_PACKAGES)); \
	if [ -n "$$base$$libvirt" ]; then \
	    echo "installing Debian packages:" $$base $$libvirt; \
	    apt-get update -qq; \
	fi; \
	if [ -n "$$base" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$base; fi; \
	if [ -n "$$libvirt" ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$libvirt; fi

# Debian's libvirtd (the libvirt provider's tests start private ones: unik.testing.LibvirtHost)
# refuses to start without the system user libvirt-qemu, which only libvirt-daemon-system (not
# wanted: it starts and configures the machine's own libvirtd) would create.
libvirt-user:
	@getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
	@getent passwd libvirt-qemu >/dev/null || \
	    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --gid libvirt-qemu libvirt-qemu

venv: $(VENV)/.installed

# libvirt-python builds from source against libvirt-dev (pkg-config, gcc, Python's headers).
$(VENV)/.installed: pyproject.toml | packages
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# The Debian cloud kernel, extracted into ~/.cache/unik/kernel (never into /boot).
kernel: venv
	$(VENV)/bin/python -m unik.kernel fetch

# The project's own micro-VM kernel from Debian's linux-source (src/unik/guest/unik-micro.config),
# built once into ~/.cache/unik/kernel (~7 min on 2 cores) and rebuilt only when the fragment
# or the source package changes.
kernel-micro: packages venv
	$(VENV)/bin/python -m unik.kernel build-micro

# The same kernel with the EFI stub and the drivers of common virtual hardware
# (src/unik/guest/unik-disk.config on top): what exported disks boot (~9 min once).
kernel-disk: kernel-micro
	$(VENV)/bin/python -m unik.kernel build-disk

run: setup
	$(VENV)/bin/unik daemon --host $(HOST) --port $(PORT)

lint: venv
	$(VENV)/bin/ruff check src tests bench

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The whole suite (bench/run.py): report and plots in bench/results/. wrk loads the API (P4).
BENCH_PACKAGES := wrk
bench: setup
	@dpkg-query -W -f='$${Status}\n' $(BENCH_PACKAGES) 2>/dev/null | grep -q '^install ok installed' || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_PACKAGES))
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
