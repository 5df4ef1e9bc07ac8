# Two commands a user needs: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 3000
DEBIAN_PACKAGES := qemu-system-x86 qemu-utils musl-tools gcc make cpio e2fsprogs dosfstools mtools kmod python3-venv python3-pip chromium chromium-driver golang-go g++ binutils cargo nodejs openjdk-17-jdk-headless bubblewrap
PYTEST_ARGS ?=

.PHONY: setup packages venv kernel run test lint bench clean

setup: packages venv kernel

# Idempotent: apt runs only when a package is missing.
packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# The Debian cloud kernel, extracted into ~/.cache/unik/kernel (never into /boot).
kernel: venv
	$(VENV)/bin/python -m unik.kernel fetch

run: setup
	$(VENV)/bin/unik daemon --host $(HOST) --port $(PORT)

lint: venv
	$(VENV)/bin/ruff check src tests bench

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/boot.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
