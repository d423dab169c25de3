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

# The main job: real Fashion-MNIST images, the fine-tuning baseline and SpotTune on ImageNet
# EfficientNet-Lite0, then SpotTune against the baseline on the same test images.
run: setup
	$(BIN)/spottune data fashion-mnist --out data/fashion-mnist --train-per-class 100 --test-per-class 50 --overwrite
	$(BIN)/spottune train --method finetune --out runs/finetune --overwrite
	$(BIN)/spottune train --method spottune --out runs/spottune --overwrite
	$(BIN)/spottune compare runs/finetune runs/spottune --report runs/comparison.md --json runs/comparison.json

test: setup
	$(BIN)/python -m pytest

lock: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	( sed -n '1,2p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable ) > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs data/fashion-mnist
