# The two commands: `make run` (embedded stack) and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: run test test-all install services browser tools clean bench

run: install
	$(VENV)/bin/quantfarm run

# `make test` (what CI runs) keeps one case per architecture family and format; `make test-all` adds the
# full matrices (tests marked `matrix`). Two test processes (pytest-xdist, a file each at a time, in the order the
# collection hook sets: files that train a model first): on two cores
# one process left a core idle most of the time (tests wait on the processes they start). TEST_PROCESSES=0 runs
# everything in one process.
TEST_PROCESSES ?= 2
XDIST := $(if $(filter 0,$(TEST_PROCESSES)),-p no:xdist,-n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder)

test: install services browser tools
	$(PY) -m pytest -m "not matrix" $(XDIST) $(PYTEST_ARGS)

test-all: install services browser tools
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the pinned CPU wheel; the constraints keep every later install on it.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[methods,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

services:
	bash scripts/services.sh

browser:
	@test -x /usr/bin/chromium || (echo "installing chromium for the browser tests" && \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

tools:
	@command -v docker-compose >/dev/null || (echo "installing docker-compose (validates the compose file in the tests)" && \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null)

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .quantfarm test-output
