# tierd developer entry points. `make demo` and `make test` work on a fresh
# Debian 12 machine: they install what they need (Debian packages, a
# virtualenv), build or reuse the cached lab kernels, and run.

VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST    ?= $(PY) -m pytest

# benchmarks/judge: the TCG plugin that counts the guest's memory accesses
# per node, against the plugin API header of the installed QEMU (fetched into
# the lab cache by `make deps`), and its known-answer workload.
LAB_CACHE ?= $(or $(TIERD_LAB_CACHE),/var/cache/tierd-lab)
JUDGE     := build/judge/judge.so build/judge/known_reads

.PHONY: all deps venv kernels judge test test-unit lint docs demo bench scale soak clean

all: test

deps:
	tests/lab/install-deps.sh

# The guest runs Debian's /usr/bin/python3, so the virtualenv must be built
# from it (and see Debian's python3-bpfcc, python3-systemd through
# --system-site-packages). The editable install compiles the C extensions in
# place (tierd/*/_*.so), so a change to one reinstalls.
$(STAMP): pyproject.toml setup.py tierd/_buffers.h $(wildcard tierd/*/_*.c) tests/lab/debian-packages.txt | deps
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: deps $(STAMP)

judge: $(JUDGE)

build/judge/judge.so: benchmarks/judge/judge.c | deps
	mkdir -p $(@D)
	gcc -O2 -Wall -Wextra -Wno-unused-parameter -shared -fPIC \
		-I$(LAB_CACHE)/qemu-plugin/current -o $@ $< -lpthread

build/judge/known_reads: benchmarks/judge/known_reads.c
	mkdir -p $(@D)
	gcc -O2 -Wall -Wextra -o $@ $<

kernels: venv
	$(PY) tests/lab/vm.py kernels

# The series' lab tests also run on the debug kernel (DEBUG_VM, lockdep, KASAN),
# a from-scratch build of its own, cached like the others.
test: venv kernels judge
	$(PY) tests/lab/vm.py kernels debug
	$(PYTEST)

test-unit: venv
	$(PYTEST) -m "not vm"

# ruff, the layer contracts in pyproject.toml (import-linter), mypy --strict.
lint: venv
	$(PY) -m ruff check tierd tests
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

# The generated references; tests fail when a committed one is stale.
docs: venv
	$(PY) -m tierd check-config --print-reference > docs/configuration.md
	$(PY) -c 'import tierd.cli as c; print(c.render_reference(), end="")' > docs/cli.md

demo: venv kernels
	$(PY) tests/lab/demo.py

bench: venv kernels judge
	$(PY) benchmarks/run.py

# tierd's memory and CPU on fabricated hosts of 2 GiB to 1 TiB (sparse files
# under SCALE_WORK, deleted after each size): benchmarks/results/scale.json and .png.
# Then one lab guest runs the same loop on a real kernel with each mover (the lab
# cross-check). About 17 minutes on 2 cores (6 of them the guest), not part of `make test`;
# figures: docs/benchmarks.md.
SCALE_WORK ?= /var/tmp/tierd-scale
scale: venv kernels
	$(PY) benchmarks/scale/run.py --work $(SCALE_WORK)

# The movers' soak at full length: 1000 round trips of 256 MiB per mover and
# THP setting on both lab kernels (hours under TCG; `make test` runs two of
# each). Prints one JSON line per soak; figures: docs/benchmarks.md.
SOAK_ROUND_TRIPS ?= 1000
soak: venv kernels
	for kernel in stock tierd; do nice $(PY) tests/lab/vm.py run --kernel $$kernel -- \
		$(PY) tests/lab/soak.py --all --round-trips $(SOAK_ROUND_TRIPS) || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
