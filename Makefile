# Quick start: `make demo` (install + built-in demo) and `make test` (install + whole test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# These two install from this machine's disk; other versions download gigabytes.
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS := offline,clip,dev,export

.PHONY: install demo test test-fast lint format bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q ".[$(EXTRAS)]" $(TORCH)
	touch $@

# A regular (non-editable) install, so that the wheel's autoload .pth is exercised exactly as users get it.
install: $(VENV)/.deps
	$(PIP) install -q --no-deps --force-reinstall --no-build-isolation . 2>/dev/null || $(PIP) install -q --no-deps --force-reinstall .

demo: install
	$(PY) -m anomalib_protorefine.demo

test: install
	$(PY) -m pytest -q -rs --durations=15
	cd $(VENV) && ./bin/python -m pytest -q -p no:cacheprovider --doctest-modules --pyargs anomalib_protorefine

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(VENV)/.deps
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

bench: install
	$(PY) -m anomalib_protorefine.benchmark --config configs/benchmark/offline.yaml
	$(PY) scripts/patchcore_speed.py
	$(PY) scripts/winclip_speed.py

clean:
	rm -rf $(VENV) build dist results .pytest_cache
