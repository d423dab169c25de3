# Two entry points: `make run` (set up, then the main job) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lock clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed
	scripts/install-system-data.sh

# The main job, as the DVC pipeline (dvc.yaml): real Fashion-MNIST images (materialised and versioned
# with `dvc add` unless data/ already holds them), manifest, validation, the fine-tuning baseline and
# SpotTune on ImageNet EfficientNet-Lite0, then SpotTune against the baseline on the same test images.
# A second `make run` reruns nothing; after editing params.yaml it reruns what depends on the edit.
PIPELINE_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" DVC_NO_ANALYTICS=1

run: setup
	$(PIPELINE_ENV) $(BIN)/spottune data fashion-mnist --out data/fashion-mnist --train-per-class 100 --test-per-class 50 --keep-existing --track
	$(PIPELINE_ENV) $(BIN)/dvc repro
	cat reports/comparison.md

test: setup
	$(BIN)/python -m pytest

lock: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	( sed -n '1,2p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable ) > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs data/fashion-mnist prepared reports
