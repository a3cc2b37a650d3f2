# make repro: create/refresh .venv, then run the pipeline (dvc repro) on the default data.
# make test:  create/refresh .venv, then run the test suite.
# make bench: create/refresh .venv, dvc repro (a no-op when done), then the benchmarks that print the
#             performance targets' ratios (docs/performance.md); benchmarks/stage_costs.py is separate (long).
# The venv is rebuilt only when pyproject.toml changes (stamp file), so both targets are idempotent.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.edc-installed
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: repro test bench lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install $(PIP_QUIET) $(TORCH_SPEC) 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import edc, torch, torchvision, dvc, mlflow, webdataset, pydantic, mlxtend"
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro
	@PATH="$(BIN):$$PATH" dvc metrics show

bench: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro
	PATH="$(BIN):$$PATH" python benchmarks/hot_paths.py
	PATH="$(BIN):$$PATH" python benchmarks/dvc_overhead.py
	PATH="$(BIN):$$PATH" python benchmarks/budgets.py
	PATH="$(BIN):$$PATH" python benchmarks/streaming.py

test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check edc stages tests benchmarks

clean-venv:
	rm -rf $(VENV)
