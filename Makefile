# sweep: `make run` runs the default study, `make test` runs the tests, `make lint` checks style,
# types and the module graph; all install first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
SWEEP  := $(VENV)/bin/sweep
# Empty STUDY: studies/hymenoptera.yaml when torchvision's hub weights can be had, otherwise
# (offline, with ../shared/weights) studies/hymenoptera_offline.yaml; the choice is printed.
STUDY  ?=
ARGS   ?=
PORT   ?= 5000
DASHBOARD_PORT ?= 8080

# Offline copies somewhere other than ../shared, for `make data` (environment or make variables):
# SWEEP_DATA_SOURCE=DIR (the hymenoptera_data folder), SWEEP_WEIGHTS_SOURCE=DIR (holding the .pth).
export SWEEP_DATA_SOURCE SWEEP_WEIGHTS_SOURCE
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install data weights run report status ui dashboard lint test bench bench-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

data: install
	$(PY) scripts/get_assets.py

# Only the offline EfficientNet-Lite0 checkpoint (a study of your own images needs no hymenoptera data).
weights: install
	$(PY) scripts/get_assets.py --weights-only

run: install data
	@study="$(STUDY)"; \
	if [ -z "$$study" ]; then \
	  if $(SWEEP) check-weights studies/hymenoptera.yaml >/dev/null 2>&1; then study=studies/hymenoptera.yaml; \
	  else echo "offline: torchvision's ResNet-18 ImageNet weights are neither cached nor downloadable;" \
	       "running studies/hymenoptera_offline.yaml (local EfficientNet-Lite0 checkpoint). Set STUDY= to choose."; \
	       study=studies/hymenoptera_offline.yaml; fi; \
	fi; \
	echo "$(SWEEP) run $$study $(ARGS)"; $(SWEEP) run $$study $(ARGS)

report: install
	$(SWEEP) report $(or $(STUDY),studies/hymenoptera_offline.yaml) $(ARGS)

status: install
	$(SWEEP) status $(or $(STUDY),studies/hymenoptera_offline.yaml)

# MLflow UI on the embedded store; first the direct links to the runs table of each study (STUDY=,
# else every study file that has runs; MLflow 3 opens an experiment on its GenAI overview otherwise)
# and to its registered model.
ui: install
	@for f in $(or $(STUDY),studies/*.yaml); do \
	  $(SWEEP) ui-links $$f --base-url http://127.0.0.1:$(PORT) || true; done
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port $(PORT)

# optuna-dashboard (the `ui` extra) on the study's Optuna storage: history, importances, trials.
dashboard: install
	@$(PY) -c "import optuna_dashboard" 2>/dev/null || $(PY) -m pip install -q -e '.[ui]'
	@echo "optuna-dashboard: http://127.0.0.1:$(DASHBOARD_PORT)/dashboard/"
	$(VENV)/bin/optuna-dashboard sqlite:///$(CURDIR)/mlruns/optuna.db --host 127.0.0.1 --port $(DASHBOARD_PORT)

# ruff (lint + format check), mypy on pipeline/, and the import-linter contracts in pyproject.toml
# (the one-way module graph). PYTHONPATH: check this checkout's `pipeline`, whatever is installed.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

test: install
	$(PY) -m pytest -q $(ARGS)

# Benchmark suites (benchmarks/README.md): every suite drives `sweep run` itself and writes
# reports/bench/<suite>.json with its ratios and targets. SUITE=name runs one; SIZE=full the long
# budgets. bench-smoke runs every suite once at a tiny size (CI): each must finish and write every
# key of its JSON (reports/bench/smoke/); no timing is judged there.
SUITE ?=
SIZE  ?= default
bench: install data
	$(PY) -m pip install -q -e '.[bench]'
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.run $(if $(SUITE),--suite $(SUITE)) --size $(SIZE) $(ARGS)

bench-smoke: install data
	$(PY) -m pip install -q -e '.[bench]'
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.run --size smoke $(ARGS)

clean:
	rm -rf mlruns reports
