# The two commands: `make run` (the main job end to end) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c requirements.lock -e ".[dev,openvino,server,k8s,gpu]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/ugt-serving demo --output demo-output

# The whole suite under coverage; then each stage module against the guide's 7.4 target.
test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q --cov --cov-report=term \
		--cov-report=json:.coverage.json
	$(PY) .ci/check_coverage.py .coverage.json

lint: setup
	$(VENV)/bin/ruff check algorithm benchmarks
	cd $(CURDIR) && $(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check algorithm benchmarks

format: setup
	$(VENV)/bin/ruff format algorithm benchmarks
	$(VENV)/bin/ruff check --fix algorithm benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
